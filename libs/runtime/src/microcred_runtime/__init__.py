"""The shared service runtime: only what every microcred service needs."""

from . import outbox
from .auth import Admin, Caller, Principal, Role, Staff
from .consumers import Outcome, Rejected, Subscriptions
from .db import Connection
from .problems import Problem
from .service import Db, Runtime, RuntimeDep, Service
from .settings import ConfigurationError, ServiceSettings, load_settings

__all__ = [
    "Admin",
    "Caller",
    "ConfigurationError",
    "Connection",
    "Db",
    "Outcome",
    "Principal",
    "Problem",
    "Rejected",
    "Role",
    "Runtime",
    "RuntimeDep",
    "Service",
    "ServiceSettings",
    "Staff",
    "Subscriptions",
    "load_settings",
    "outbox",
]
