"""The curated public API of batchclient is pinned."""

import batchclient

EXPECTED = {
    "EXIT_AUTH", "EXIT_BALANCE", "EXIT_ERROR", "EXIT_INPUT", "EXIT_INTERRUPTED", "EXIT_OK",
    "EXIT_NO_ANSWERS", "EXIT_SPEND_CAP",
    "AiohttpTransport", "BatchSettings", "BreakerSettings", "Call", "ChatReply", "ClientConfig",
    "Clock", "ConcurrencySettings", "ConfigError", "CostMeter", "Done", "Engine", "Event",
    "EventHook", "FunctionTransport", "InputError", "InteractiveClient", "Item", "ItemResult",
    "JobResult", "JobStore", "LanePolicy", "ModelLimits", "Page", "Price", "ProgressSnapshot",
    "ProviderSettings", "Response", "ResultCache", "RetrySettings", "RouteRule", "Runner",
    "ScaledClock", "Send", "SqliteJobStore", "SqliteResultCache", "StoreCounts",
    "StoreVersionError", "StreamSettings", "Task", "ThrottleSettings", "Tier", "Transport",
    "Usage", "UserLimited", "UserLimits", "Wait", "fan_out", "parse_client_config", "parse_task",
    "render",
}


def test_all_is_pinned_and_importable() -> None:
    assert set(batchclient.__all__) == EXPECTED
    assert len(batchclient.__all__) == len(EXPECTED)
    for name in batchclient.__all__:
        assert getattr(batchclient, name) is not None


def test_exit_statuses_follow_the_conventions() -> None:
    assert (batchclient.EXIT_OK, batchclient.EXIT_ERROR, batchclient.EXIT_INPUT,
            batchclient.EXIT_BALANCE, batchclient.EXIT_AUTH, batchclient.EXIT_NO_ANSWERS,
            batchclient.EXIT_SPEND_CAP, batchclient.EXIT_INTERRUPTED) == (0, 1, 2, 3, 4, 5, 6,
                                                                          130)
