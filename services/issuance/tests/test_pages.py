"""The credential page and badge: what they show, and that nobody's text can turn into markup."""

import json
import uuid
from datetime import UTC, datetime
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree

import pytest

from issuance import pages
from issuance.api import json_media_type, prefers_html
from issuance.domain import Credential, DisplayStatus
from issuance.pages import CredentialView
from microcred_events import CredentialKind, Learner

HOSTILE = '<script>alert("x")</script> & \' "'
URL = "https://credentials.microcred.example/credentials/7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47"


def view(**changes: Any) -> CredentialView:
    values: dict[str, Any] = {
        "credential_url": URL,
        "badge_url": f"{URL}/badge.svg",
        "card_url": f"{URL}/card.png",
        "jwt_url": f"{URL}/jwt",
        "verify_url": "https://credentials.microcred.example/verify",
        "name": "Data Analysis Foundations",
        "description": "Cleans, analyses and visualises tabular data with Python.",
        "issuer_name": "Northwind University",
        "issuer_url": "https://northwind.example.edu/",
        "learner_name": "Ada Lovelace",
        "issued_at": datetime(2026, 3, 1, 9, 30, tzinfo=UTC),
        "valid_until": datetime(2028, 2, 29, 9, 30, tzinfo=UTC),
        "status": DisplayStatus.VALID,
        "criteria": "Complete all six modules.",
        "skills": [("Manage data for analysis", "https://esco.example/S5.6.1")],
        "evidence": [("https://northwind.example.edu/portfolio/ada", "Completed with a final score of 92%.")],
        "credential_id": "7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47",
    }
    return CredentialView(**{**values, **changes})


class Parsed(HTMLParser):
    """The tags, meta properties, links and text of a page."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.meta: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.text: list[str] = []
        self._anchor: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        attributes = {name: value or "" for name, value in attrs}
        if tag == "meta" and ("property" in attributes or "name" in attributes):
            self.meta[attributes.get("property") or attributes["name"]] = attributes.get("content", "")
        if tag == "a":
            self._anchor = attributes.get("href", "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._anchor is not None and data.strip():
            self.links[data.strip()] = self._anchor
            self._anchor = None


def test_the_page_shows_the_credential_and_previews_well() -> None:
    parsed = Parsed(pages.credential_page(view()))
    text = " ".join(parsed.text)

    shown = (
        "Data Analysis Foundations",
        "Northwind University",
        "Ada Lovelace",
        "01 March 2026",
        "29 February 2028",
        "Valid",
        "Manage data for analysis",
        "Complete all six modules.",
    )
    assert [item for item in shown if item not in text] == []
    assert parsed.meta["og:title"] == "Data Analysis Foundations"
    assert parsed.meta["og:url"] == URL
    assert parsed.meta["og:image"] == f"{URL}/card.png"
    assert parsed.meta["og:image:type"] == "image/png"
    assert parsed.meta["twitter:card"] == "summary_large_image"
    assert parsed.meta["twitter:image"] == f"{URL}/card.png"
    assert parsed.meta["og:type"] == "website"
    assert "Ada Lovelace earned Data Analysis Foundations" in parsed.meta["og:description"]
    assert parsed.links["Northwind University"] == "https://northwind.example.edu/"


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        (DisplayStatus.REVOKED, "Revoked by the issuer"),
        (DisplayStatus.SUSPENDED, "Suspended by the issuer"),
        (DisplayStatus.EXPIRED, "Expired"),
    ],
)
def test_the_page_says_when_a_credential_is_no_longer_good(status: DisplayStatus, shown: str) -> None:
    assert shown in " ".join(Parsed(pages.credential_page(view(status=status))).text)


@pytest.mark.parametrize(
    ("status", "offered"),
    [
        (DisplayStatus.VALID, True),
        (DisplayStatus.EXPIRED, True),  # with its expiry date, as LinkedIn records one
        (DisplayStatus.REVOKED, False),
        (DisplayStatus.SUSPENDED, False),
    ],
)
def test_only_a_credential_in_good_standing_offers_the_linkedin_link(
    status: DisplayStatus, offered: bool
) -> None:
    assert ("Add to LinkedIn profile" in Parsed(pages.credential_page(view(status=status))).links) is offered


def test_the_verify_button_opens_the_issuers_checks() -> None:
    assert Parsed(pages.credential_page(view())).links["Verify"] == f"{URL}/verification"


def test_the_verification_page_shows_each_check_and_escapes_its_detail() -> None:
    checks = [
        ("structure", "passed", "an OpenBadgeCredential"),
        ("signature", "passed", "signed by did:web:x#key-1"),
        ("dates", "passed", "within its validity"),
        ("status", "failed", HOSTILE),
    ]
    parsed = Parsed(
        pages.verification_page(HOSTILE, URL, "invalid", checks, datetime(2026, 12, 6, tzinfo=UTC))
    )
    text = " ".join(parsed.text)

    assert "script" not in parsed.tags
    assert "Not valid: a check failed" in text
    assert "Status: neither revoked nor suspended by the issuer" in text
    assert HOSTILE in text
    assert parsed.links["Back to the credential"] == URL


def test_the_page_offers_the_baked_badges_to_download() -> None:
    links = Parsed(pages.credential_page(view())).links

    assert links["Badge with the credential inside (PNG)"] == f"{URL}/baked.png"
    assert links["(SVG)"] == f"{URL}/baked.svg"


def test_the_not_found_page_escapes_what_it_was_given() -> None:
    parsed = Parsed(pages.not_found_page(HOSTILE))

    assert "script" not in parsed.tags
    assert HOSTILE in " ".join(parsed.text)


def test_the_linkedin_link_fills_in_the_certification() -> None:
    parsed = Parsed(pages.credential_page(view(name="C++ & Rust: 100%")))
    link = urlsplit(parsed.links["Add to LinkedIn profile"])
    query = parse_qs(link.query)

    assert (link.scheme, link.netloc, link.path) == ("https", "www.linkedin.com", "/profile/add")
    assert {name: values[0] for name, values in query.items()} == {
        "startTask": "CERTIFICATION_NAME",
        "name": "C++ & Rust: 100%",
        "organizationName": "Northwind University",
        "issueYear": "2026",
        "issueMonth": "3",
        "expirationYear": "2028",
        "expirationMonth": "2",
        "certUrl": URL,
        "certId": "7e2b9d4c-5a1f-4c36-b8e0-6d3a2f9c1e47",
    }
    no_expiry = parse_qs(urlsplit(pages.linkedin_url(view(valid_until=None))).query)
    assert "expirationYear" not in no_expiry


def test_nobodys_text_becomes_markup() -> None:
    page = pages.credential_page(
        view(
            name=HOSTILE,
            issuer_name=HOSTILE,
            learner_name=HOSTILE,
            description=HOSTILE,
            criteria=HOSTILE,
            skills=[(HOSTILE, None)],
            evidence=[(None, HOSTILE)],
        )
    )
    parsed = Parsed(page)

    assert "script" not in parsed.tags
    assert "<script>" not in page
    assert HOSTILE in " ".join(parsed.text), "shown as text, unchanged"
    assert parsed.meta["og:title"] == HOSTILE, "attributes keep their quotes escaped"


def test_only_http_urls_become_links() -> None:
    document = {
        "name": "X",
        "issuer": {"name": "Y", "url": "javascript:alert(1)"},
        "credentialSubject": {
            "achievement": {
                "name": "X",
                "criteria": {"narrative": "n"},
                "alignment": [{"targetName": "skill", "targetUrl": "javascript:alert(2)"}],
            }
        },
        "evidence": [{"id": "data:text/html,<script>alert(3)</script>", "narrative": "work"}],
    }
    credential = Credential(
        credential_id=uuid.uuid4(),
        kind=CredentialKind.COURSE,
        learner=Learner(learner_id=uuid.uuid4(), email="ada@example.org", display_name="Ada"),
        issuer_id=uuid.uuid4(),
        achievement_id=uuid.uuid4(),
        achievement_name="X",
        document=json.dumps(document),
        document_sha256="0" * 64,
        issued_at=datetime(2026, 1, 1, tzinfo=UTC),
        valid_until=None,
        revocation_list_id=uuid.uuid4(),
        revocation_index=1,
    )
    shown = CredentialView.of(credential, document, datetime.now(UTC), credential_url=URL, verify_url="v")
    page = pages.credential_page(shown)

    assert (shown.issuer_url, shown.skills, shown.evidence) == (None, [("skill", None)], [(None, "work")])
    assert "javascript:" not in page
    assert "data:text/html" not in page


def test_the_badge_is_well_formed_svg_whatever_the_name() -> None:
    svg = pages.badge_svg(HOSTILE + " with a very long achievement name indeed that wraps", HOSTILE)

    root = ElementTree.fromstring(svg)  # noqa: S314  (our own output, the thing under test)
    texts = "".join(root.itertext())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "<script>" in texts, "the name is text inside the SVG"
    assert not any(element.tag.endswith("script") for element in root.iter())


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # browsers
        ("text/html", True),
        ("*/*", False),  # curl, wallets
        ("", False),
        ("application/json", False),
        ("application/ld+json, text/html;q=0.5", False),
        ("text/html;q=0, */*", False),
        ("application/vc, text/*", True),
    ],
)
def test_browsers_get_the_page_and_everyone_else_the_credential(accept: str, html: bool) -> None:
    assert prefers_html(accept) is html


@pytest.mark.parametrize(
    ("accept", "media_type"),
    [
        ("*/*", "application/vc"),
        ("", "application/vc"),
        ("application/ld+json", "application/ld+json"),
        ("application/json", "application/json"),
        ("application/json;q=0.5, application/ld+json", "application/ld+json"),
    ],
)
def test_the_credential_comes_as_the_json_type_asked_for(accept: str, media_type: str) -> None:
    assert json_media_type(accept) == media_type
