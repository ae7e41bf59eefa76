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
    payment_max_declines: int = Field(
        default=3,
        ge=1,
        le=100,
        description=(
            "Declined charges a payment takes before it fails for good and the enrollment is cancelled; "
            "before that, the learner checks out again (another card). 1: the first decline is final."
        ),
    )
