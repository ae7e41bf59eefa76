"""The shared service runtime: only what every microcred service needs."""

from . import journeys, outbox
from .audit import AuditEntry
from .auth import Admin, Caller, Principal, Role, Staff, Viewer
from .body_limit import max_body_bytes
from .consumers import Delivery, Outcome, Rejected, Subscriptions
from .db import Connection
from .pagination import Cursor, Limit, Page, decode_cursor, encode_cursor
from .problems import PROBLEM_JSON, Problem, ProblemDetails, problem_doc
from .rate_limit import LimitedCaller, RateLimited
from .service import Db, Runtime, RuntimeDep, Service
from .settings import ConfigurationError, ServiceSettings, load_settings

__all__ = [
    "PROBLEM_JSON",
    "Admin",
    "AuditEntry",
    "Caller",
    "ConfigurationError",
    "Connection",
    "Cursor",
    "Db",
    "Delivery",
    "Limit",
    "LimitedCaller",
    "Outcome",
    "Page",
    "Principal",
    "Problem",
    "ProblemDetails",
    "RateLimited",
    "Rejected",
    "Role",
    "Runtime",
    "RuntimeDep",
    "Service",
    "ServiceSettings",
    "Staff",
    "Subscriptions",
    "Viewer",
    "decode_cursor",
    "encode_cursor",
    "journeys",
    "load_settings",
    "max_body_bytes",
    "outbox",
    "problem_doc",
]
