from pydantic import Field

from microcred_runtime import ServiceSettings


class Settings(ServiceSettings):
    http_port: int = Field(default=8001, ge=1, le=65535)
