"""The shared service runtime: only what every microcred service needs."""

from . import outbox
from .consumers import Outcome, Rejected, Subscriptions
from .db import Connection
from .problems import Problem
from .service import Db, Runtime, RuntimeDep, Service
from .settings import ConfigurationError, ServiceSettings, load_settings

__all__ = [
    "ConfigurationError",
    "Connection",
    "Db",
    "Outcome",
    "Problem",
    "Rejected",
    "Runtime",
    "RuntimeDep",
    "Service",
    "ServiceSettings",
    "Subscriptions",
    "load_settings",
    "outbox",
]
