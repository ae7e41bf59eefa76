from pydantic import Field

from microcred_runtime import ServiceSettings


class Settings(ServiceSettings):
    http_port: int = Field(default=8001, ge=1, le=65535)
    course_list_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description=(
            "How long clients and shared caches may keep a page of the published course or pathway "
            "list (Cache-Control: max-age). Each process keeps the published answers until a write, "
            "whoever makes it. 0: nothing is kept anywhere."
        ),
    )
