"""The catalog service against a real Kafka broker and PostgreSQL server.

Staff create, update, publish and retire courses and pathways, and each change other services
care about arrives on its topic; the public browses published courses with filters, full-text
search and cursor pages; bad input and missing rights get problem+json; a stale `If-Match` gets
412; the launch catalog seeds once, however often the seed runs.
"""

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest

import catalog.main
import catalog.public_cache
import catalog.seed
import catalog.settings
from microcred_events import (
    CoursePublished,
    CourseRetired,
    CourseSnapshot,
    CourseUpdated,
    Event,
    PathwayPublished,
    PathwaySnapshot,
    Topic,
    decode,
    example_data,
)
from microcred_runtime import encode_cursor

Json = dict[str, Any]

DETAILS: Json = {
    name: value
    for name, value in example_data(CourseSnapshot).items()
    if name not in ("course_id", "version")
}
PATHWAY: Json = {
    name: value
    for name, value in example_data(PathwaySnapshot).items()
    if name not in ("pathway_id", "version")
}
PROBLEM_JSON = "application/problem+json"


@pytest.fixture
async def database(new_database: Callable[[], Any]) -> str:
    url: str = await new_database()
    return url


@pytest.fixture
def settings(database: str, make_settings: Callable[..., Any]) -> catalog.settings.Settings:
    made: catalog.settings.Settings = make_settings(catalog.settings.Settings, database)
    return made


@pytest.fixture
async def api(settings: catalog.settings.Settings, serve: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(catalog.main.create_app(settings)) as client:
        yield client


@pytest.fixture
def staff(bearer: Callable[..., dict[str, str]]) -> dict[str, str]:
    return bearer("staff-1", "staff")


@pytest.fixture
def learner(bearer: Callable[..., dict[str, str]]) -> dict[str, str]:
    return bearer("learner-1", "learner")


@pytest.fixture
async def db(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database)
    try:
        yield conn
    finally:
        await conn.close()


def assert_problem(response: httpx.Response, status: int, kind: str | None = None) -> Json:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body: Json = response.json()
    assert body["status"] == status
    assert body["detail"]
    if kind is not None:
        assert body["type"] == f"urn:microcred:problem:{kind}", body
    return body


async def create_course(api: httpx.AsyncClient, staff: dict[str, str], **changes: Any) -> Json:
    response = await api.post("/courses", json={**DETAILS, **changes}, headers=staff)
    assert response.status_code == 201, response.text
    course: Json = response.json()
    return course


async def publish_course(api: httpx.AsyncClient, staff: dict[str, str], course_id: str) -> Json:
    response = await api.post(f"/courses/{course_id}/publish", headers=staff)
    assert response.status_code == 200, response.text
    course: Json = response.json()
    return course


async def published_course(api: httpx.AsyncClient, staff: dict[str, str], **changes: Any) -> Json:
    return await publish_course(api, staff, (await create_course(api, staff, **changes))["course_id"])


async def events(topic_reader: Any, topic: str, count: int) -> list[Event]:
    records = await topic_reader(topic, count)
    assert len(records) == count, f"{len(records)} of {count} events arrived on {topic}"
    envelopes = [decode(record.headers, record.value) for record in records]
    for record, envelope in zip(records, envelopes, strict=True):
        # Keyed by the aggregate, so one course's events stay in order on one partition.
        assert record.key == envelope.event.aggregate_id().encode() == envelope.subject.encode()
        assert envelope.source == "urn:microcred:catalog"
    return [envelope.event for envelope in envelopes]


async def outbox_rows(db: asyncpg.Connection) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM outbox")
    return count


async def test_a_course_lifecycle_is_announced_in_order(
    api: httpx.AsyncClient,
    staff: dict[str, str],
    db: asyncpg.Connection,
    topic_reader: Any,
    topic_prefix: str,
) -> None:
    created = await api.post("/courses", json=DETAILS, headers=staff)
    assert created.status_code == 201, created.text
    course = created.json()
    course_id = course["course_id"]
    assert (course["status"], course["version"], created.headers["etag"]) == ("draft", 1, '"1"')
    assert created.headers["location"] == f"/courses/{course_id}"
    assert course["created_at"].endswith("Z")

    draft_edit = await api.put(
        f"/courses/{course_id}", json={**DETAILS, "title": "Draft title"}, headers=staff
    )
    assert (draft_edit.status_code, draft_edit.json()["version"]) == (200, 2)

    published = await publish_course(api, staff, course_id)
    assert (published["status"], published["version"]) == ("published", 3)

    changed = {**DETAILS, "title": "Final title", "price": {"amount_minor": 12900, "currency": "EUR"}}
    updated = await api.put(f"/courses/{course_id}", json=changed, headers=staff)
    assert (updated.status_code, updated.json()["version"], updated.headers["etag"]) == (200, 4, '"4"')
    unchanged = await api.put(f"/courses/{course_id}", json=changed, headers=staff)
    assert (unchanged.status_code, unchanged.json()["version"]) == (200, 4)

    retired = await api.post(
        f"/courses/{course_id}/retire", json={"reason": "Replaced by a new edition."}, headers=staff
    )
    assert (retired.status_code, retired.json()["status"], retired.json()["version"]) == (200, "retired", 5)
    again = await publish_course(api, staff, course_id)
    assert (again["status"], again["version"]) == ("published", 6)

    announced = await events(topic_reader, topic_prefix + Topic.CATALOG_COURSE, 4)
    assert [type(event) for event in announced] == [
        CoursePublished,
        CourseUpdated,
        CourseRetired,
        CoursePublished,
    ]
    first, update, retirement, republication = announced
    assert isinstance(first, CoursePublished)
    assert (str(first.course.course_id), first.course.version, first.course.title) == (
        course_id,
        3,
        "Draft title",
    )
    assert isinstance(update, CourseUpdated)
    assert (update.course.version, update.course.title, update.course.price.amount_minor) == (
        4,
        "Final title",
        12900,
    )
    assert isinstance(retirement, CourseRetired)
    assert (str(retirement.course_id), retirement.reason) == (course_id, "Replaced by a new edition.")
    assert isinstance(republication, CoursePublished)
    assert republication.course.version == 6
    # The draft edit and the unchanged update announced nothing: these four are all there is.
    assert await outbox_rows(db) == 4


async def test_the_public_sees_only_published_courses_and_staff_see_all(
    api: httpx.AsyncClient, staff: dict[str, str], learner: dict[str, str]
) -> None:
    draft = await create_course(api, staff, title="A draft")
    published = await published_course(api, staff, title="B published")
    retired = await published_course(api, staff, title="C retired")
    assert (await api.post(f"/courses/{retired['course_id']}/retire", headers=staff)).status_code == 200

    listed = (await api.get("/courses")).json()
    assert [course["course_id"] for course in listed["items"]] == [published["course_id"]]
    assert listed["next_cursor"] is None
    for hidden in (draft, retired):
        assert_problem(await api.get(f"/courses/{hidden['course_id']}"), 404, "course-not-found")
        assert_problem(
            await api.get(f"/courses/{hidden['course_id']}", headers=learner), 404, "course-not-found"
        )
    assert_problem(await api.get(f"/courses/{uuid.uuid4()}", headers=staff), 404, "course-not-found")

    public = await api.get(f"/courses/{published['course_id']}")
    assert (public.status_code, public.headers["etag"]) == (200, f'"{published["version"]}"')
    seen_by_staff = await api.get(f"/courses/{draft['course_id']}", headers=staff)
    assert (seen_by_staff.status_code, seen_by_staff.json()["status"]) == (200, "draft")

    drafts = await api.get("/courses", params={"status": "draft"}, headers=staff)
    assert [course["title"] for course in drafts.json()["items"]] == ["A draft"]
    everything = await api.get(
        "/courses", params={"status": ["draft", "published", "retired"]}, headers=staff
    )
    assert [course["title"] for course in everything.json()["items"]] == [
        "A draft",
        "B published",
        "C retired",
    ]
    assert_problem(await api.get("/courses", params={"status": "draft"}), 401, "unauthorized")
    assert_problem(await api.get("/courses", params={"status": "retired"}, headers=learner), 403, "forbidden")
    bad_token = await api.get("/courses", headers={"Authorization": "Bearer not-a-jwt"})
    assert_problem(bad_token, 401, "unauthorized")


async def titles_listed(api: httpx.AsyncClient) -> list[str]:
    response = await api.get("/courses")
    assert response.status_code == 200, response.text
    return [course["title"] for course in response.json()["items"]]


async def lists(api: httpx.AsyncClient, titles: list[str]) -> bool:
    return await titles_listed(api) == titles


async def test_the_published_list_is_kept_until_the_catalog_changes_whoever_changes_it(
    api: httpx.AsyncClient, staff: dict[str, str], db: asyncpg.Connection, wait_for: Any
) -> None:
    first = await published_course(api, staff, title="A first")
    # The publication's own notification clears what is kept when it arrives, which on a loaded
    # machine can be after the next answer was kept: let it arrive first (CI saw it late).
    await asyncio.sleep(1.0)
    listed = await api.get("/courses")
    assert [course["title"] for course in listed.json()["items"]] == ["A first"]
    assert listed.headers["cache-control"] == "public, max-age=2"
    first_id = uuid.UUID(first["course_id"])

    # The page is kept: a change that tells no one (its notification switched off) goes unseen...
    async with db.transaction():
        await db.execute("ALTER TABLE courses DISABLE TRIGGER courses_changed")
        await db.execute("UPDATE courses SET status = 'retired' WHERE course_id = $1", first_id)
        await db.execute("ALTER TABLE courses ENABLE TRIGGER courses_changed")
    await asyncio.sleep(0.5)  # time for a notification to arrive, were there one
    assert await titles_listed(api) == ["A first"]

    # ...while another process's change (here: straight in the database) shows once its
    # notification arrives (see the next test)...
    await db.execute("UPDATE courses SET details = details WHERE course_id = $1", first_id)
    assert await wait_for(lambda: lists(api, []), timeout=10)

    # ...and this process's own writes at once: publish, update and retire.
    await publish_course(api, staff, first["course_id"])
    assert await titles_listed(api) == ["A first"]
    second = await published_course(api, staff, title="B second")
    assert await titles_listed(api) == ["A first", "B second"]
    renamed = {**{name: second[name] for name in DETAILS}, "title": "C second, renamed"}
    assert (await api.put(f"/courses/{second['course_id']}", json=renamed, headers=staff)).status_code == 200
    assert await titles_listed(api) == ["A first", "C second, renamed"]
    assert (await api.post(f"/courses/{first['course_id']}/retire", headers=staff)).status_code == 200
    assert await titles_listed(api) == ["C second, renamed"]

    # Staff listings of what the public does not see are never kept.
    drafts = await api.get("/courses", params={"status": "retired"}, headers=staff)
    assert [course["title"] for course in drafts.json()["items"]] == ["A first"]
    assert drafts.headers["cache-control"] == "private, no-cache"


async def test_a_write_through_one_process_shows_in_the_others_answers(
    settings: catalog.settings.Settings, serve: Any, staff: dict[str, str], wait_for: Any
) -> None:
    async with (
        serve(catalog.main.create_app(settings)) as api,
        serve(catalog.main.create_app(settings)) as other,
    ):
        course = await published_course(api, staff, title="Before")
        url = f"/courses/{course['course_id']}"
        # The other process keeps its answers (asked twice: the second answer is the kept one).
        for _ in range(2):
            before_list, before_one = await other.get("/courses"), await other.get(url)
            assert [item["title"] for item in before_list.json()["items"]] == ["Before"]
            assert (before_one.json()["title"], before_one.headers["etag"]) == ("Before", '"2"')

        renamed = await api.put(url, json={**DETAILS, "title": "After"}, headers=staff)
        assert renamed.status_code == 200, renamed.text
        # Seen once the write's notification has reached the other process: its delivery is
        # the only wait (a GET sent at once after the commit may come before it).
        assert await wait_for(lambda: lists(other, ["After"]), timeout=10)
        # The one notification dropped every answer the other process kept, and no answer of
        # the old state comes back: not the body, not a 304 for its ETag.
        for _ in range(3):
            assert await titles_listed(other) == ["After"]
            one = await other.get(url)
            assert (one.json()["title"], one.headers["etag"]) == ("After", '"3"')
        old_page = await other.get("/courses", headers={"If-None-Match": before_list.headers["etag"]})
        assert [item["title"] for item in old_page.json()["items"]] == ["After"]
        old_version = await other.get(url, headers={"If-None-Match": before_one.headers["etag"]})
        assert (old_version.status_code, old_version.json()["version"]) == (200, 3)

        retired = await api.post(f"{url}/retire", headers=staff)
        assert retired.status_code == 200, retired.text
        assert await wait_for(lambda: lists(other, []), timeout=10)
        assert_problem(await other.get(url), 404, "course-not-found")


async def listener_pid(db: asyncpg.Connection) -> int | None:
    """The backend of the catalog process's LISTEN connection (see catalog.public_cache)."""
    pid: int | None = await db.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
        catalog.public_cache.CHANNEL,
    )
    return pid


async def listening_again(db: asyncpg.Connection, before: int) -> bool:
    pid = await listener_pid(db)
    return pid is not None and pid != before


async def test_a_write_missed_while_not_listening_is_not_hidden_by_a_kept_answer(
    api: httpx.AsyncClient, staff: dict[str, str], db: asyncpg.Connection, wait_for: Any
) -> None:
    course = await published_course(api, staff, title="Before")
    assert await titles_listed(api) == ["Before"]
    listening = await listener_pid(db)
    assert listening is not None

    # The listening connection is cut, and a write commits before it is back: its
    # notification reaches no one.
    await db.execute("SELECT pg_terminate_backend($1)", listening)
    await db.execute(
        "UPDATE courses SET details = jsonb_set(details, '{title}', '\"After\"') WHERE course_id = $1",
        uuid.UUID(course["course_id"]),
    )
    assert await wait_for(lambda: listening_again(db, listening), timeout=30)
    assert await titles_listed(api) == ["After"]
    assert (await api.get(f"/courses/{course['course_id']}")).json()["title"] == "After"


async def test_one_item_is_told_304_while_its_version_is_the_same(
    api: httpx.AsyncClient, staff: dict[str, str]
) -> None:
    communication = await published_course(api, staff, title="Communication")
    thinking = await published_course(api, staff, title="Critical Thinking")
    created = await api.post(
        "/pathways",
        json={**PATHWAY, "course_ids": [communication["course_id"], thinking["course_id"]]},
        headers=staff,
    )
    pathway_url = f"/pathways/{created.json()['pathway_id']}"
    assert (await api.post(f"{pathway_url}/publish", headers=staff)).status_code == 200
    course_url = f"/courses/{communication['course_id']}"

    for url, version in ((course_url, communication["version"]), (pathway_url, 2)):
        for _ in range(2):  # read, then kept
            current = await api.get(url, headers={"If-None-Match": f'"{version}"'})
            assert (current.status_code, current.content) == (304, b"")
            assert current.headers["etag"] == f'"{version}"'
        full = await api.get(url, headers={"If-None-Match": f'W/"{version - 1}"'})
        assert (full.status_code, full.json()["version"], full.headers["etag"]) == (
            200,
            version,
            f'"{version}"',
        )
        assert full.headers["content-type"] == "application/json"

    changed = await api.put(course_url, json={**DETAILS, "title": "Communication 2"}, headers=staff)
    newer = await api.get(course_url, headers={"If-None-Match": f'"{communication["version"]}"'})
    assert (newer.status_code, newer.json()["title"]) == (200, "Communication 2")
    assert newer.headers["etag"] == changed.headers["etag"]
    # Staff reading a draft are told too, though that answer is never kept.
    draft = await create_course(api, staff, title="Draft")
    staff_read = await api.get(f"/courses/{draft['course_id']}", headers={**staff, "If-None-Match": '"1"'})
    assert staff_read.status_code == 304
    # The pathway list has page digests like the course list.
    pathways = await api.get("/pathways")
    assert pathways.headers["cache-control"] == "public, max-age=2"
    again = await api.get("/pathways", headers={"If-None-Match": pathways.headers["etag"]})
    assert (again.status_code, again.headers["etag"]) == (304, pathways.headers["etag"])


async def test_kept_answers_carry_the_same_headers_cors_included(
    database: str, make_settings: Callable[..., Any], serve: Any, staff: dict[str, str]
) -> None:
    origin = "https://learn.example.edu"
    settings = make_settings(catalog.settings.Settings, database, cors_origins=[origin])
    async with serve(catalog.main.create_app(settings)) as api:
        course = await published_course(api, staff)
        for url in ("/courses", f"/courses/{course['course_id']}", "/pathways"):
            read, kept = [await api.get(url, headers={"Origin": origin}) for _ in range(2)]
            assert read.content == kept.content
            assert dict(read.headers) == dict(kept.headers), url
            assert kept.headers["access-control-allow-origin"] == origin
            assert "etag" in kept.headers["access-control-expose-headers"].lower()
            assert kept.headers["content-type"] == "application/json"


async def test_a_client_holding_the_current_page_is_told_304_until_it_changes(
    api: httpx.AsyncClient, staff: dict[str, str]
) -> None:
    await published_course(api, staff, title="A first")
    listed = await api.get("/courses")
    etag = listed.headers["etag"]

    unchanged = await api.get("/courses", headers={"If-None-Match": etag})
    other = await api.get("/courses", headers={"If-None-Match": '"not-this-page"'})
    await published_course(api, staff, title="B second")
    changed = await api.get("/courses", headers={"If-None-Match": etag})

    assert (unchanged.status_code, unchanged.content) == (304, b"")
    assert unchanged.headers["etag"] == etag
    assert unchanged.headers["cache-control"] == "public, max-age=2"
    assert (other.status_code, other.json()) == (200, listed.json())
    assert changed.status_code == 200
    assert [course["title"] for course in changed.json()["items"]] == ["A first", "B second"]
    assert changed.headers["etag"] != etag
    # Staff listings of drafts carry one too, though they are never kept.
    drafts = await api.get("/courses", params={"status": "draft"}, headers=staff)
    again = await api.get(
        "/courses", params={"status": "draft"}, headers={**staff, "If-None-Match": drafts.headers["etag"]}
    )
    assert again.status_code == 304


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/courses", DETAILS),
        ("PUT", "/courses/{course_id}", DETAILS),
        ("POST", "/courses/{course_id}/publish", None),
        ("POST", "/courses/{course_id}/retire", None),
        ("POST", "/pathways", PATHWAY),
        ("POST", "/pathways/{pathway_id}/publish", None),
    ],
)
async def test_changing_the_catalog_needs_staff(
    api: httpx.AsyncClient,
    learner: dict[str, str],
    db: asyncpg.Connection,
    method: str,
    path: str,
    body: Json | None,
) -> None:
    url = path.format(course_id=uuid.uuid4(), pathway_id=uuid.uuid4())
    anonymous = await api.request(method, url, json=body)
    assert_problem(anonymous, 401, "unauthorized")
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert_problem(await api.request(method, url, json=body, headers=learner), 403, "forbidden")
    assert await db.fetchval("SELECT (SELECT count(*) FROM courses) + (SELECT count(*) FROM pathways)") == 0


async def test_admins_may_do_what_staff_do(
    api: httpx.AsyncClient, bearer: Callable[..., dict[str, str]]
) -> None:
    course = await published_course(api, bearer("admin-1", "admin"))
    assert course["status"] == "published"


async def test_filters_combine_and_search_understands_words(
    api: httpx.AsyncClient, staff: dict[str, str]
) -> None:
    await published_course(
        api,
        staff,
        title="Durable Skills - Communication",
        overview="Write, speak and listen with purpose.",
        audiences=["Career Changers", "new managers"],
        skills=["public speaking", "Active Listening"],
        format="online",
        price={"amount_minor": 10000, "currency": "USD"},
    )
    await published_course(
        api,
        staff,
        title="Lockout/Tagout Safety Training",
        overview="Control hazardous energy before servicing machines.",
        audiences=["maintenance technicians"],
        skills=["workplace safety"],
        format="in_person",
        price={"amount_minor": 9900, "currency": "USD"},
    )
    await published_course(
        api,
        staff,
        title="Open Source Basics",
        overview="Contribute to your first project; free for everyone.",
        audiences=["students", "career changers"],
        skills=["git"],
        format="hybrid",
        price={"amount_minor": 0, "currency": "USD"},
    )
    await published_course(
        api,
        staff,
        title="Datenanalyse mit Python",
        overview="Pandas from the ground up.",
        audiences=["analysts"],
        skills=["Python", "pandas"],
        format="employer_site",
        price={"amount_minor": 10000, "currency": "EUR"},
    )
    await create_course(api, staff, title="Unpublished Python draft", skills=["python"])

    async def titles(**params: Any) -> list[str]:
        response = await api.get("/courses", params=params)
        assert response.status_code == 200, response.text
        return [course["title"] for course in response.json()["items"]]

    communication, datenanalyse, lockout, open_source = (
        "Durable Skills - Communication",
        "Datenanalyse mit Python",
        "Lockout/Tagout Safety Training",
        "Open Source Basics",
    )
    assert await titles() == [datenanalyse, communication, lockout, open_source]
    assert await titles(q="  ") == [datenanalyse, communication, lockout, open_source], "an empty search box"
    assert await titles(format="in_person") == [lockout]
    assert await titles(format=["online", "hybrid"]) == [communication, open_source]
    assert await titles(currency="USD", min_price=9900, max_price=10000) == [communication, lockout]
    assert await titles(currency="usd", min_price=9901) == [communication]
    assert await titles(currency="USD", max_price=0) == [open_source]
    assert await titles(currency="EUR") == [datenanalyse]
    assert await titles(audience="career changers") == [communication, open_source]
    assert await titles(audience="CAREER CHANGERS", format="hybrid") == [open_source]
    assert await titles(skill="python") == [datenanalyse]
    assert await titles(skill="speaking") == [], "skill matches a whole label"
    # Full-text search over title, skills and overview, with English stemming.
    assert await titles(q="communicating") == [communication]
    assert await titles(q="listening") == [communication]
    assert await titles(q="machine") == [lockout]
    assert await titles(q="python") == [datenanalyse]
    assert await titles(q="safety OR pandas") == [datenanalyse, lockout]
    assert await titles(q='"hazardous energy" -git') == [lockout]
    assert await titles(q="free", currency="USD", max_price=0) == [open_source]
    for odd in ("'", "a & b | !c", "((", ":*", "the", "🎓", "\\"):
        assert await titles(q=odd) == [], odd


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ({"currency": "USD", "min_price": 500, "max_price": 100}, "invalid-filter"),
        ({"min_price": 100}, "invalid-filter"),
        ({"currency": "US"}, "invalid-request"),
        ({"currency": "USD", "min_price": -1}, "invalid-request"),
        ({"currency": "USD", "max_price": 2**63}, "invalid-request"),
        ({"min_price": "cheap"}, "invalid-request"),
        ({"format": "by_carrier_pigeon"}, "invalid-request"),
        ({"status": "deleted"}, "invalid-request"),
        ({"q": "x" * 201}, "invalid-request"),
        ({"audience": "   "}, "invalid-request"),
        ({"limit": 0}, "invalid-request"),
        ({"limit": 101}, "invalid-request"),
    ],
)
async def test_bad_search_parameters_are_a_422_problem(
    api: httpx.AsyncClient, params: Json, kind: str
) -> None:
    assert_problem(await api.get("/courses", params=params), 422, kind)


async def test_cursor_pages_cover_every_course_once_even_while_courses_are_added(
    api: httpx.AsyncClient, staff: dict[str, str]
) -> None:
    # Repeated titles make the id decide the order between them.
    for number in range(23):
        await published_course(api, staff, title=f"Course {number % 9:02d}")
    expected = sorted(
        (
            (course["title"], course["course_id"])
            for course in (await api.get("/courses?limit=100")).json()["items"]
        ),
    )
    assert len(expected) == 23

    seen: list[tuple[str, str]] = []
    cursor = None
    pages = 0
    while True:
        params: Json = {"limit": 5} | ({"cursor": cursor} if cursor else {})
        page = (await api.get("/courses", params=params)).json()
        seen += [(course["title"], course["course_id"]) for course in page["items"]]
        pages += 1
        if pages == 2:
            # Before and after the pages already read: only the later one may appear.
            await published_course(api, staff, title="Course 00")
            late = await published_course(api, staff, title="Course 99")
            expected.append(("Course 99", late["course_id"]))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 5
    assert len(seen) == len(set(seen)) == 24
    assert seen == expected, "pages skipped, repeated or reordered courses"


@pytest.mark.parametrize(
    "cursor", ["not base64!", encode_cursor(["only one"]), encode_cursor([1, "not-a-uuid"]), "W10="]
)
async def test_a_cursor_we_did_not_make_is_a_400_problem(api: httpx.AsyncClient, cursor: str) -> None:
    assert_problem(await api.get("/courses", params={"cursor": cursor}), 400, "invalid-cursor")
    assert_problem(await api.get("/pathways", params={"cursor": cursor}), 400, "invalid-cursor")


@pytest.mark.parametrize(
    "body",
    [
        {name: value for name, value in DETAILS.items() if name != "title"},
        {**DETAILS, "discount_percent": 10},
        {**DETAILS, "price": {"amount_minor": 99.5, "currency": "USD"}},
        {**DETAILS, "price": {"amount_minor": 9900, "currency": "usd"}},
        {**DETAILS, "price": {"amount_minor": -1, "currency": "USD"}},
        {**DETAILS, "format": "correspondence"},
        {**DETAILS, "duration": {"amount": 0, "unit": "days"}},
        {**DETAILS, "issuer": {**DETAILS["issuer"], "url": "not a url"}},
        {**DETAILS, "title": ""},
        {**DETAILS, "skills": [""]},
    ],
)
async def test_a_bad_course_is_a_422_problem(
    api: httpx.AsyncClient, staff: dict[str, str], db: asyncpg.Connection, body: Json
) -> None:
    problem = assert_problem(await api.post("/courses", json=body, headers=staff), 422, "invalid-request")
    assert problem["errors"]
    assert await db.fetchval("SELECT count(*) FROM courses") == 0


async def test_a_body_that_is_not_json_is_a_422_problem(
    api: httpx.AsyncClient, staff: dict[str, str]
) -> None:
    response = await api.post(
        "/courses", content=b"{title:", headers={**staff, "content-type": "application/json"}
    )
    assert_problem(response, 422, "invalid-request")
    assert_problem(await api.get("/courses/not-a-uuid"), 422, "invalid-request")


async def test_lifecycle_conflicts_are_409_problems(
    api: httpx.AsyncClient, staff: dict[str, str], db: asyncpg.Connection
) -> None:
    draft = await create_course(api, staff)
    assert_problem(
        await api.post(f"/courses/{draft['course_id']}/retire", headers=staff), 409, "course-state"
    )
    published = await publish_course(api, staff, draft["course_id"])
    assert_problem(
        await api.post(f"/courses/{draft['course_id']}/publish", headers=staff), 409, "course-state"
    )
    await api.post(f"/courses/{draft['course_id']}/retire", headers=staff)
    assert_problem(
        await api.post(f"/courses/{draft['course_id']}/retire", headers=staff), 409, "course-state"
    )
    assert_problem(await api.post(f"/courses/{uuid.uuid4()}/publish", headers=staff), 404, "course-not-found")
    assert_problem(
        await api.put(f"/courses/{uuid.uuid4()}", json=DETAILS, headers=staff), 404, "course-not-found"
    )
    current = await db.fetchrow("SELECT version, status FROM courses")
    assert current is not None
    assert (current["version"], current["status"]) == (published["version"] + 1, "retired")
    assert await outbox_rows(db) == 2, "a refused change announced something"


async def test_a_change_based_on_a_stale_read_is_a_412_problem(
    api: httpx.AsyncClient, staff: dict[str, str], db: asyncpg.Connection
) -> None:
    course = await published_course(api, staff)
    url = f"/courses/{course['course_id']}"
    etag = (await api.get(url)).headers["etag"]
    assert etag == f'"{course["version"]}"'

    first = await api.put(url, json={**DETAILS, "title": "First"}, headers={**staff, "If-Match": etag})
    assert first.status_code == 200, first.text
    stale = await api.put(url, json={**DETAILS, "title": "Second"}, headers={**staff, "If-Match": etag})
    problem = assert_problem(stale, 412, "version-mismatch")
    assert problem["current_version"] == first.json()["version"]
    assert stale.headers["etag"] == first.headers["etag"]
    assert_problem(
        await api.post(f"{url}/retire", headers={**staff, "If-Match": etag}), 412, "version-mismatch"
    )
    assert_problem(
        await api.put(url, json=DETAILS, headers={**staff, "If-Match": f"W/{first.headers['etag']}"}), 412
    )
    assert (await api.get(url)).json()["title"] == "First"

    anything = await api.put(url, json={**DETAILS, "title": "Third"}, headers={**staff, "If-Match": "*"})
    assert anything.status_code == 200, anything.text

    assert (await api.get(url)).json()["version"] == course["version"] + 2


async def while_locked(
    database: str, course_id: str, requests: list[Awaitable[httpx.Response]], wait_for: Any
) -> list[httpx.Response]:
    """Send requests that change one course while its row is locked, and let them go only once
    each waits on PostgreSQL: they truly race, whatever the scheduling of the test client."""
    holder, watcher = await asyncpg.connect(database), await asyncpg.connect(database)
    try:
        async with holder.transaction():
            await holder.execute("SELECT FROM courses WHERE course_id = $1 FOR UPDATE", uuid.UUID(course_id))
            racing = [asyncio.ensure_future(request) for request in requests]
            all_waiting = await wait_for(
                lambda: watcher.fetchval(
                    "SELECT count(*) = $1 FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    len(racing),
                )
            )
        assert all_waiting, "the requests never reached the locked row"
        return list(await asyncio.gather(*racing))
    finally:
        await holder.close()
        await watcher.close()


async def test_concurrent_changes_of_a_course_take_turns(
    api: httpx.AsyncClient, staff: dict[str, str], database: str, db: asyncpg.Connection, wait_for: Any
) -> None:
    draft = await create_course(api, staff)
    url = f"/courses/{draft['course_id']}"
    publishing = await while_locked(
        database, draft["course_id"], [api.post(f"{url}/publish", headers=staff) for _ in range(2)], wait_for
    )
    assert sorted(response.status_code for response in publishing) == [200, 409]

    # Two editors who read the same version: one wins, the other is told; no update is lost.
    etag = next(response for response in publishing if response.status_code == 200).headers["etag"]
    editing = await while_locked(
        database,
        draft["course_id"],
        [
            api.put(url, json={**DETAILS, "title": title}, headers={**staff, "If-Match": etag})
            for title in ("Editor A", "Editor B")
        ],
        wait_for,
    )
    assert sorted(response.status_code for response in editing) == [200, 412]
    winner = next(response for response in editing if response.status_code == 200).json()
    stored = await db.fetchrow("SELECT version, details->>'title' AS title FROM courses")
    assert stored is not None
    assert (
        (stored["version"], stored["title"]) == (winner["version"], winner["title"]) == (3, winner["title"])
    )
    announced = await db.fetch("SELECT event_type FROM outbox ORDER BY id")
    assert [row["event_type"] for row in announced] == [CoursePublished.TYPE, CourseUpdated.TYPE]


async def test_a_pathway_of_published_courses_is_announced(
    api: httpx.AsyncClient,
    staff: dict[str, str],
    learner: dict[str, str],
    topic_reader: Any,
    topic_prefix: str,
) -> None:
    communication = await published_course(api, staff, title="Communication")
    thinking = await create_course(api, staff, title="Critical Thinking")
    ids = [communication["course_id"], thinking["course_id"]]

    for course_ids in ([ids[0]], [ids[0], ids[0]], []):
        refused = await api.post("/pathways", json={**PATHWAY, "course_ids": course_ids}, headers=staff)
        assert_problem(refused, 422, "invalid-request")
    stranger = str(uuid.uuid4())
    unknown = await api.post("/pathways", json={**PATHWAY, "course_ids": [ids[0], stranger]}, headers=staff)
    assert assert_problem(unknown, 422, "unknown-courses")["course_ids"] == [stranger]

    created = await api.post(
        "/pathways", json={**PATHWAY, "title": "Durable Skills", "course_ids": ids}, headers=staff
    )
    assert created.status_code == 201, created.text
    pathway = created.json()
    url = f"/pathways/{pathway['pathway_id']}"
    assert (pathway["status"], pathway["version"], created.headers["location"]) == ("draft", 1, url)
    assert_problem(await api.get(url, headers=learner), 404, "pathway-not-found")
    assert (await api.get(url, headers=staff)).json()["status"] == "draft"
    assert (await api.get("/pathways")).json()["items"] == []
    assert len((await api.get("/pathways", params={"status": "draft"}, headers=staff)).json()["items"]) == 1
    assert_problem(await api.get("/pathways", params={"status": "draft"}, headers=learner), 403, "forbidden")

    not_yet = assert_problem(await api.post(f"{url}/publish", headers=staff), 409, "pathway-state")
    assert thinking["course_id"] in not_yet["detail"]
    await publish_course(api, staff, thinking["course_id"])
    published = await api.post(f"{url}/publish", headers={**staff, "If-Match": created.headers["etag"]})
    assert published.status_code == 200, published.text
    assert (published.json()["status"], published.json()["version"]) == ("published", 2)
    assert_problem(await api.post(f"{url}/publish", headers=staff), 409, "pathway-state")

    public = await api.get("/pathways")
    assert [item["pathway_id"] for item in public.json()["items"]] == [pathway["pathway_id"]]
    assert (await api.get(url)).json()["course_ids"] == ids

    (event,) = await events(topic_reader, topic_prefix + Topic.CATALOG_PATHWAY, 1)
    assert isinstance(event, PathwayPublished)
    assert str(event.pathway.pathway_id) == pathway["pathway_id"]
    assert [str(course_id) for course_id in event.pathway.course_ids] == ids
    assert (event.pathway.version, event.pathway.title) == (2, "Durable Skills")


async def test_seeding_twice_publishes_the_launch_catalog_once(
    api: httpx.AsyncClient, db: asyncpg.Connection, topic_reader: Any, topic_prefix: str
) -> None:
    runs = []
    for _ in range(2):
        async with db.transaction():
            runs.append(await catalog.seed.seed(db))
    assert (len(runs[0].courses), len(runs[0].pathways)) == (6, 1)
    assert (runs[1].courses, runs[1].pathways) == ([], [])

    listed = (await api.get("/courses", params={"limit": 100})).json()["items"]
    assert {course["title"] for course in listed} == {
        details.title for details in catalog.seed.COURSES.values()
    }
    assert all(course["status"] == "published" for course in listed)
    prices = {course["title"]: (course["price"]["amount_minor"], course["format"]) for course in listed}
    assert prices["Introduction to Generative AI"] == (1000, "online")
    assert prices["Introduction to CAD & Fusion 360: The Contours of Creation"] == (35000, "in_person")
    assert prices["Lockout/Tagout Safety Training"] == (9900, "in_person")
    pathways = (await api.get("/pathways")).json()["items"]
    assert [(pathway["title"], len(pathway["course_ids"])) for pathway in pathways] == [("Durable Skills", 2)]
    free_text = await api.get("/courses", params={"q": "fusion"})
    assert [course["course_id"] for course in free_text.json()["items"]] == [str(catalog.seed.CAD_FUSION_360)]

    assert await outbox_rows(db) == 7, "the second run queued events again"
    announced = await events(topic_reader, topic_prefix + Topic.CATALOG_COURSE, 6)
    assert all(isinstance(event, CoursePublished) for event in announced)
    assert {event.aggregate_id() for event in announced} == {
        str(course_id) for course_id in catalog.seed.COURSES
    }
    (pathway_event,) = await events(topic_reader, topic_prefix + Topic.CATALOG_PATHWAY, 1)
    assert isinstance(pathway_event, PathwayPublished)
    assert pathway_event.pathway.course_ids == (catalog.seed.COMMUNICATION, catalog.seed.CRITICAL_THINKING)


async def test_the_seed_command_reads_the_service_settings(
    settings: catalog.settings.Settings, db: asyncpg.Connection
) -> None:
    environment = {
        **os.environ,
        "DATABASE_URL": str(settings.database_url),
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "AUTH_ISSUER": settings.auth_issuer,
        "AUTH_JWKS_FILE": str(settings.auth_jwks_file),
    }

    async def seed_command(env: dict[str, str]) -> tuple[int | None, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "catalog.seed",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, stdout.decode(), stderr.decode()

    first = await seed_command(environment)
    assert first[0] == 0, first
    assert "6 of 6 courses and 1 of 1 pathways" in first[1]
    second = await seed_command(environment)
    assert second[0] == 0, second
    assert "0 of 6 courses and 0 of 1 pathways" in second[1]
    assert await db.fetchval("SELECT count(*) FROM courses WHERE status = 'published'") == 6
    assert await outbox_rows(db) == 7

    unconfigured = await seed_command({k: v for k, v in environment.items() if k != "DATABASE_URL"})
    assert unconfigured[0] == 2
    assert "DATABASE_URL" in unconfigured[2]


async def test_text_postgresql_cannot_hold_is_refused_not_a_500(
    api: httpx.AsyncClient, staff: dict[str, str]
) -> None:
    # PostgreSQL text and jsonb cannot hold the NUL character.
    for params in ({"q": "a\x00b"}, {"audience": "a\x00"}, {"skill": "\x00"}):
        assert_problem(await api.get("/courses", params=params), 422, "invalid-request")
    forged = encode_cursor(["\x00", str(uuid.uuid4())])
    assert_problem(await api.get("/courses", params={"cursor": forged}), 400, "invalid-cursor")
    assert_problem(await api.get("/pathways", params={"cursor": forged}), 400, "invalid-cursor")
    for body in (
        {**DETAILS, "title": "a\x00"},
        {**DETAILS, "issuer": {**DETAILS["issuer"], "name": "Academy\x00"}},
        {**DETAILS, "skills": ["\x00"]},
    ):
        assert_problem(await api.post("/courses", json=body, headers=staff), 422, "invalid-request")
    pathway = {**PATHWAY, "achievement": {**PATHWAY["achievement"], "criteria_narrative": "\x00"}}
    assert_problem(await api.post("/pathways", json=pathway, headers=staff), 422, "invalid-request")
