"""Views of a credential for people: the page employers see, and its badge image.

Both are built from the signed credential and its recorded status. Every value from the credential
(names, criteria, URLs) is text someone else wrote: it is escaped for HTML/XML (`html.escape`,
quotes included, so it is safe in attributes too), and only http(s) URLs become links.
"""

import textwrap
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from .domain import Credential, DisplayStatus

STATUS_TEXT = {
    DisplayStatus.VALID: "Valid",
    DisplayStatus.REVOKED: "Revoked by the issuer",
    DisplayStatus.SUSPENDED: "Suspended by the issuer",
    DisplayStatus.EXPIRED: "Expired",
}
STATUS_COLOUR = {
    DisplayStatus.VALID: "#1b7f3b",
    DisplayStatus.REVOKED: "#b3261e",
    DisplayStatus.SUSPENDED: "#9a6700",
    DisplayStatus.EXPIRED: "#6e6e6e",
}


@dataclass(frozen=True)
class CredentialView:
    """What the page shows, read from the signed credential and the record."""

    credential_url: str
    badge_url: str
    card_url: str
    jwt_url: str
    verify_url: str
    name: str
    description: str
    issuer_name: str
    issuer_url: str | None
    learner_name: str
    issued_at: datetime
    valid_until: datetime | None
    status: DisplayStatus
    criteria: str
    skills: list[tuple[str, str | None]]
    evidence: list[tuple[str | None, str | None]]
    credential_id: str

    @classmethod
    def of(
        cls,
        credential: Credential,
        document: dict[str, Any],
        now: datetime,
        *,
        credential_url: str,
        verify_url: str,
    ) -> "CredentialView":
        """The view of a credential we issued (so its document has the shape `domain` gives it)."""
        issuer = document["issuer"]
        achievement = document["credentialSubject"]["achievement"]
        return cls(
            credential_url=credential_url,
            badge_url=f"{credential_url}/badge.svg",
            card_url=f"{credential_url}/card.png",
            jwt_url=f"{credential_url}/jwt",
            verify_url=verify_url,
            name=str(document.get("name") or achievement.get("name") or credential.achievement_name),
            description=str(achievement.get("description") or document.get("description") or ""),
            issuer_name=str(issuer["name"]),
            issuer_url=_http_url(issuer.get("url")),
            learner_name=credential.learner.display_name,
            issued_at=credential.issued_at,
            valid_until=credential.valid_until,
            status=credential.status(now),
            criteria=str(achievement.get("criteria", {}).get("narrative", "")),
            skills=[
                (str(item["targetName"]), _http_url(item.get("targetUrl")))
                for item in achievement.get("alignment", [])
            ],
            evidence=[
                (_http_url(item.get("id")), str(item["narrative"]) if "narrative" in item else None)
                for item in document.get("evidence", [])
            ],
            credential_id=str(credential.credential_id),
        )


def _http_url(value: Any) -> str | None:
    """The URL if it is an absolute http(s) URL, so that `javascript:` and the like never become links."""
    if not isinstance(value, str):
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def linkedin_url(view: CredentialView) -> str:
    """LinkedIn's "Add to profile" link for a certification, with this credential filled in."""
    parameters: dict[str, str | int] = {
        "startTask": "CERTIFICATION_NAME",
        "name": view.name,
        "organizationName": view.issuer_name,
        "issueYear": view.issued_at.year,
        "issueMonth": view.issued_at.month,
    }
    if view.valid_until is not None:
        parameters["expirationYear"] = view.valid_until.year
        parameters["expirationMonth"] = view.valid_until.month
    parameters["certUrl"] = view.credential_url
    parameters["certId"] = view.credential_id
    return "https://www.linkedin.com/profile/add?" + urlencode(parameters, quote_via=quote)


def _date(moment: datetime) -> str:
    return f"{moment:%d %B %Y}"


def _link(url: str | None, text: str) -> str:
    if url is None:
        return escape(text)
    return f'<a href="{escape(url)}" rel="nofollow noopener">{escape(text)}</a>'


def credential_page(view: CredentialView) -> str:
    """The human-readable page of a credential, with Open Graph and Twitter card tags."""
    summary = f"{view.learner_name} earned {view.name}, issued by {view.issuer_name}."
    status_text = STATUS_TEXT[view.status]
    skills = "".join(f"<li>{_link(url, name)}</li>" for name, url in view.skills if name)
    # A revoked or suspended credential is not one to show off: no link puts it on a profile.
    linkedin = (
        f'<a id="linkedin" href="{escape(linkedin_url(view))}" rel="noopener">Add to LinkedIn profile</a>\n'
        if view.status in (DisplayStatus.VALID, DisplayStatus.EXPIRED)
        else ""
    )
    evidence = "".join(
        f"<li>{_link(url, url or '')}{(' ' + escape(narrative)) if narrative else ''}</li>"
        for url, narrative in view.evidence
        if url or narrative
    )
    expiry = (
        f"<dt>Expires</dt><dd>{escape(_date(view.valid_until))}</dd>"
        if view.valid_until
        else "<dt>Expires</dt><dd>Does not expire</dd>"
    )
    # Link previews (LinkedIn, Facebook, X, Slack) show a raster image only: the PNG card.
    meta = {
        "og:title": view.name,
        "og:description": summary,
        "og:image": view.card_url,
        "og:image:type": "image/png",
        "og:image:width": "1200",
        "og:image:height": "630",
        "og:image:alt": summary,
        "og:url": view.credential_url,
        "og:type": "website",
        "twitter:card": "summary_large_image",
        "twitter:title": view.name,
        "twitter:description": summary,
        "twitter:image": view.card_url,
    }
    meta_tags = "\n".join(
        f'<meta {"property" if name.startswith("og:") else "name"}="{name}" content="{escape(value)}">'
        for name, value in meta.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(view.name)} - {escape(view.learner_name)}</title>
<meta name="description" content="{escape(summary)}">
{meta_tags}
<link rel="alternate" type="application/ld+json" href="{escape(view.credential_url)}">
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1f2328; }}
main {{ max-width: 44rem; margin: 2rem auto; background: #fff; padding: 2rem; border-radius: 12px;
        box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
header {{ display: flex; gap: 1.5rem; align-items: center; }}
header img {{ width: 8rem; height: 8rem; }}
h1 {{ margin: 0 0 .25rem; font-size: 1.6rem; }}
.status {{ display: inline-block; padding: .2rem .7rem; border-radius: 999px; color: #fff;
           background: {STATUS_COLOUR[view.status]}; font-weight: 600; }}
dl {{ display: grid; grid-template-columns: max-content 1fr; gap: .4rem 1rem; }}
dt {{ font-weight: 600; }}
dd {{ margin: 0; }}
.actions a {{ display: inline-block; margin: .5rem 1rem .5rem 0; }}
.verify {{ font-size: .9rem; color: #57606a; border-top: 1px solid #d0d7de; padding-top: 1rem; }}
.button {{ display: inline-block; padding: .5rem 1.2rem; border-radius: 6px; background: #3b5bdb;
           color: #fff; text-decoration: none; font-weight: 600; }}
</style>
</head>
<body>
<main>
<header>
<img src="{escape(view.badge_url)}" alt="Badge: {escape(view.name)}">
<div>
<h1 id="credential-name">{escape(view.name)}</h1>
<p>Awarded to <strong id="learner-name">{escape(view.learner_name)}</strong>
by <strong id="issuer-name">{_link(view.issuer_url, view.issuer_name)}</strong></p>
<p><span class="status" id="status" data-status="{view.status.value}">{escape(status_text)}</span></p>
</div>
</header>
<p>{escape(view.description)}</p>
<dl>
<dt>Issued</dt><dd>{escape(_date(view.issued_at))}</dd>
{expiry}
<dt>Status</dt><dd>{escape(status_text)}</dd>
</dl>
<h2>What it takes</h2>
<p id="criteria">{escape(view.criteria)}</p>
{f'<h2>Skills</h2><ul id="skills">{skills}</ul>' if skills else ""}
{f'<h2>Evidence</h2><ul id="evidence">{evidence}</ul>' if evidence else ""}
<p class="actions">
{linkedin}<a href="{escape(view.credential_url)}?format=json"
type="application/ld+json">Signed credential (JSON-LD)</a>
<a href="{escape(view.jwt_url)}" type="application/vc+jwt">VC-JWT</a>
<a id="baked-png" href="{escape(view.credential_url)}/baked.png"
download>Badge with the credential inside (PNG)</a>
<a id="baked-svg" href="{escape(view.credential_url)}/baked.svg" download>(SVG)</a>
</p>
<p><a class="button" id="verify-button" href="{escape(view.credential_url)}/verification"
rel="nofollow">Verify</a></p>
<p class="verify" id="verify">This is a signed Open Badges 3.0 credential: you need not take this page's
word for it. Check it with any Open Badges 3.0 verifier, or POST its JSON to
<code>{escape(view.verify_url)}</code>. The signature, the dates and the issuer's revocation list
are checked.</p>
</main>
</body>
</html>
"""


_CHECK_NAMES = {
    "structure": "Structure: an Open Badges 3.0 credential, its members and contexts",
    "signature": "Signature: the proof, by a key of the issuer's DID",
    "dates": "Dates: issued, and not expired",
    "status": "Status: neither revoked nor suspended by the issuer",
}
_RESULT_COLOUR = {"passed": "#1b7f3b", "failed": "#b3261e", "unknown": "#6e6e6e"}
_VERDICT_TEXT = {
    "valid": "Verified: every check passed",
    "invalid": "Not valid: a check failed",
    "unknown": "Could not be verified: a check could not be decided",
}


def verification_page(
    name: str, credential_url: str, verdict: str, checks: list[tuple[str, str, str]], checked_at: datetime
) -> str:
    """The issuer's checks of a credential, each with its result and why, for people."""
    rows = "".join(
        f'<li data-check="{escape(check)}" data-result="{escape(result)}"><span class="result"'
        f' style="background:{_RESULT_COLOUR.get(result, "#6e6e6e")}">{escape(result)}</span> '
        f"<strong>{escape(_CHECK_NAMES.get(check, check))}</strong><br><small>{escape(detail)}</small></li>"
        for check, result, detail in checks
    )
    style = """ul { list-style: none; padding: 0; }
li { margin: 0 0 1rem; }
.result { display: inline-block; min-width: 5rem; text-align: center; padding: .1rem .5rem;
          border-radius: 999px; color: #fff; font-weight: 600; }
small { color: #57606a; }"""
    body = f"""<h1>{escape(name)}</h1>
<p id="verdict" data-verdict="{escape(verdict)}">
<strong>{escape(_VERDICT_TEXT.get(verdict, verdict))}</strong>,
checked {escape(f"{checked_at:%d %B %Y %H:%M} UTC")} by its issuer's service.</p>
<ul id="checks">{rows}</ul>
<p><a href="{escape(credential_url)}">Back to the credential</a></p>"""
    return _unlisted_page(f"Verification - {name}", body, style)


def not_found_page(credential_id: str) -> str:
    """The page a browser gets for a credential id that names no credential."""
    body = f"""<h1>No such credential</h1>
<p id="not-found">No credential has the id <code>{escape(credential_id)}</code>. Check the link you were
given: it may have been cut short or mistyped. A credential that was revoked still has its page,
which says so.</p>"""
    return _unlisted_page("No such credential", body)


def _unlisted_page(title: str, body: str, style: str = "") -> str:
    """A page in the credential page's look that search engines leave out; `body` is HTML."""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1f2328; }}
main {{ max-width: 44rem; margin: 2rem auto; background: #fff; padding: 2rem; border-radius: 12px;
        box-shadow: 0 1px 4px rgba(0,0,0,.12); }}
{style}
</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""


BAKED_NAMESPACE = "https://purl.imsglobal.org/ob/v3p0"


def baked_svg(name: str, issuer_name: str, credential_json: str) -> str:
    """The badge with the signed credential in an `openbadges:credential` element (Open Badges 3.0
    baking, §5.3), first in the `<svg>` element as the specification places it, as CDATA: the
    JSON as it is, a "]]>" in it split across two sections, and U+FFFE and U+FFFF (which JSON
    allows and XML does not) as JSON escapes."""
    text = credential_json.replace("\ufffe", "\\ufffe").replace("\uffff", "\\uffff")
    cdata = "<![CDATA[" + text.replace("]]>", "]]]]><![CDATA[>") + "]]>"
    head, _, rest = badge_svg(name, issuer_name).partition(">\n")  # the opening <svg ...> tag
    head = head.replace("<svg ", f'<svg xmlns:openbadges="{BAKED_NAMESPACE}" ', 1)
    return f"{head}>\n<openbadges:credential>{cdata}</openbadges:credential>\n{rest}"


def badge_svg(name: str, issuer_name: str) -> str:
    """A generated badge: the achievement's name on a seal, with the issuer's name."""
    lines = textwrap.wrap(name, width=18, max_lines=4, placeholder="...") or [""]
    first_y = 150 - (len(lines) - 1) * 13
    text = "".join(
        f'<tspan x="150" y="{first_y + 26 * number}">{escape(line)}</tspan>'
        for number, line in enumerate(lines)
    )
    issuer = textwrap.shorten(issuer_name, width=34, placeholder="...")
    font = 'font-family="Helvetica, Arial, sans-serif" fill="#fff" text-anchor="middle"'
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="300" height="300" viewBox="0 0 300 300"'
        f' role="img" aria-label="{escape(name)}">\n'
        f"<title>{escape(name)} - {escape(issuer_name)}</title>\n"
        '<defs><linearGradient id="g" x1="0" y1="0" x2="1" y2="1">'
        '<stop offset="0" stop-color="#2f5fd0"/><stop offset="1" stop-color="#173a8c"/>'
        "</linearGradient></defs>\n"
        '<circle cx="150" cy="150" r="144" fill="#d9a520"/>\n'
        '<circle cx="150" cy="150" r="132" fill="url(#g)"/>\n'
        '<circle cx="150" cy="150" r="120" fill="none"'
        ' stroke="#fff" stroke-opacity=".4" stroke-width="2"/>\n'
        f'<text {font} font-size="22" font-weight="700">{text}</text>\n'
        f'<text x="150" y="250" {font} font-size="13" fill-opacity=".85">{escape(issuer)}</text>\n'
        "</svg>\n"
    )
