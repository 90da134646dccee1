"""The batching client: pure policy (``batchclient.policy``) and its asyncio shell.

Run a job with ``Runner(task, config, transport, store).run()`` or ``ratelab job``; the
SimPy planner drives the same ``Engine`` in virtual time.
"""

from batchclient.cache import ResultCache, SqliteResultCache
from batchclient.clock import Clock, ScaledClock
from batchclient.config import (
    BatchSettings,
    BreakerSettings,
    ClientConfig,
    ConcurrencySettings,
    ConfigError,
    ModelLimits,
    Price,
    ProviderSettings,
    RetrySettings,
    RouteRule,
    StreamSettings,
    Task,
    ThrottleSettings,
    parse_client_config,
    parse_task,
)
from batchclient.cost import CostMeter
from batchclient.events import Event, EventHook
from batchclient.fanout import fan_out
from batchclient.interactive import ChatReply, InteractiveClient, UserLimited
from batchclient.policy.engine import (
    EXIT_AUTH,
    EXIT_BALANCE,
    EXIT_ERROR,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_NO_ANSWERS,
    EXIT_OK,
    EXIT_SPEND_CAP,
    Done,
    Engine,
    InputError,
    ItemResult,
    Send,
    Wait,
)
from batchclient.policy.lanes import LanePolicy
from batchclient.policy.userlimits import Tier, UserLimits
from batchclient.policy.wire import Call, Item, Response, Usage
from batchclient.progress import ProgressSnapshot, render
from batchclient.runner import JobResult, Runner
from batchclient.store import JobStore, Page, SqliteJobStore, StoreCounts, StoreVersionError
from batchclient.transport import AiohttpTransport, FunctionTransport, Transport

__all__ = [
    "EXIT_AUTH",
    "EXIT_BALANCE",
    "EXIT_ERROR",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_NO_ANSWERS",
    "EXIT_OK",
    "EXIT_SPEND_CAP",
    "AiohttpTransport",
    "BatchSettings",
    "BreakerSettings",
    "Call",
    "ChatReply",
    "ClientConfig",
    "Clock",
    "ConcurrencySettings",
    "ConfigError",
    "CostMeter",
    "Done",
    "Engine",
    "Event",
    "EventHook",
    "FunctionTransport",
    "InputError",
    "InteractiveClient",
    "Item",
    "ItemResult",
    "JobResult",
    "JobStore",
    "LanePolicy",
    "ModelLimits",
    "Page",
    "Price",
    "ProgressSnapshot",
    "ProviderSettings",
    "Response",
    "ResultCache",
    "RetrySettings",
    "RouteRule",
    "Runner",
    "ScaledClock",
    "Send",
    "SqliteJobStore",
    "SqliteResultCache",
    "StoreCounts",
    "StoreVersionError",
    "StreamSettings",
    "Task",
    "ThrottleSettings",
    "Tier",
    "Transport",
    "Usage",
    "UserLimited",
    "UserLimits",
    "Wait",
    "fan_out",
    "parse_client_config",
    "parse_task",
    "render",
]
