"""OpenAI-shaped error bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from simulator.model.headers import format_duration
from simulator.model.limits import CONCURRENCY, DAY, INPUT, OUTPUT, REQUESTS, TOKENS, Denial

RATE_LIMITS_URL = "https://platform.openai.com/account/rate-limits"

# how OpenAI's messages name each limit, and the error type they carry
_LIMIT_TEXT = {
    REQUESTS: ("requests per min (RPM)", "requests"),
    TOKENS: ("tokens per min (TPM)", "tokens"),
    INPUT: ("input tokens per min (ITPM)", "tokens"),
    OUTPUT: ("output tokens per min (OTPM)", "tokens"),
    DAY: ("tokens per day (TPD)", "tokens"),
    CONCURRENCY: ("concurrent requests", "requests"),
}


class Invalid(ValueError):
    """Raised inside request validation (the body's fields, and structured.py's shapes);
    carries the 400 body."""

    def __init__(self, body: dict):
        super().__init__(body["error"]["message"])
        self.body = body


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> dict:
    """A 400 ``invalid_request_error`` body."""
    return error_body(message, "invalid_request_error", param, code)


def missing_key() -> dict:
    """401 body when no API key is sent."""
    return invalid_request(
        "You didn't provide an API key. You need to provide your API key in an Authorization "
        "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")


def invalid_key(key: str) -> dict:
    """401 body for an unknown API key (masked as OpenAI does)."""
    masked = key[:8] + "*" * min(20, max(0, len(key) - 12)) + key[-4:] if len(key) > 12 else "***"
    return invalid_request(
        f"Incorrect API key provided: {masked}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.", code="invalid_api_key")


def model_not_found(model: str) -> dict:
    """404 body for an unknown model."""
    return invalid_request(
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found")


def rate_limited(denial: Denial, model: str, org: str, wait_s: float) -> dict:
    """429 body saying which limit was hit, with OpenAI's wording (clients match "Rate limit")."""
    what, type_ = _LIMIT_TEXT[denial.limit]
    if denial.too_large:
        return error_body(
            f"Request too large for {model} in organization {org} on {what}: "
            f"Limit {int(denial.capacity)}, Requested {int(denial.requested)}. The input or "
            f"output tokens must be reduced in order to run successfully. Visit "
            f"{RATE_LIMITS_URL} to learn more.", type_, None, "rate_limit_exceeded")
    return error_body(
        f"Rate limit reached for {model} in organization {org} on {what}: "
        f"Limit {int(denial.capacity)}, Used {int(denial.used)}, Requested "
        f"{int(denial.requested)}. Please try again in {format_duration(wait_s)}. Visit "
        f"{RATE_LIMITS_URL} to learn more.", type_, None, "rate_limit_exceeded")


def money_exhausted(style: str, balance_usd: float) -> tuple[int, dict]:
    """Status and body once a key's balance is spent, in the provider's style."""
    if style == "openai":
        return 429, error_body(
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            "insufficient_quota", None, "insufficient_quota")
    if style == "anthropic":
        body = error_body(
            "You have reached your specified API usage limits. You will regain access once "
            "your spend limit is raised.", "rate_limit_error", None,
            "enforced_spend_limit_reached")
        body["error"]["details"] = {"error_code": "enforced_spend_limit_reached"}
        return 429, body
    return 402, error_body(
        f"Insufficient credits: your balance is {balance_usd:.6f} USD. Top up your account "
        "to continue.", "insufficient_credits", None, "insufficient_credits")


def server_error(status: int) -> dict:
    """Body of a random or scheduled 5xx."""
    if status == 503:
        return error_body("The server is overloaded or not ready yet.", "server_error", None,
                          "service_unavailable")
    return error_body("The server had an error while processing your request. Sorry about "
                      "that!", "server_error", None, None)
