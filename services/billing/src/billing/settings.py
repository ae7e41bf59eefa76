from pydantic import Field, HttpUrl

from microcred_runtime import ServiceSettings

from .webhooks import WebhookSecret


class Settings(ServiceSettings):
    http_port: int = Field(default=8003, ge=1, le=65535)
    payment_provider_url: HttpUrl = Field(
        default=HttpUrl("http://127.0.0.1:8090"),
        description="Base URL of the payment provider's API; the local simulator by default.",
    )
    payment_webhook_secret: WebhookSecret = Field(
        description="Secret shared with the payment provider: it signs webhooks with it (HMAC-SHA256).",
    )
    reconcile_after_seconds: float = Field(
        default=600,
        ge=0,
        le=30 * 24 * 3600,
        description=(
            "How long a settled payment may wait for enrollment to activate its enrollment, and a refund "
            "for the provider's answer, before staff's discrepancy list shows it (and any other "
            "discrepancy, from when it began)."
        ),
    )
    payment_max_declines: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "Declined charges a payment takes before it fails for good and the enrollment is cancelled; "
            "before that, the learner checks out again (another card). 1: the first decline is final."
        ),
    )
