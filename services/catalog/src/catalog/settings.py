from pydantic import Field

from microcred_runtime import ServiceSettings


class Settings(ServiceSettings):
    http_port: int = Field(default=8001, ge=1, le=65535)
    course_list_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description=(
            "How long each process keeps a page of the published course list: another replica's "
            "writes show within this time. 0 turns it off."
        ),
    )
