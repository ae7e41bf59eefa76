from pydantic import Field

from microcred_runtime import ServiceSettings


class Settings(ServiceSettings):
    http_port: int = Field(default=8005, ge=1, le=65535)
