"""The PNG badge and share card: real PNGs of the right size, showing the status, whatever the text;
and the baked badges, which carry the signed credential."""

import io
import json
import struct
from datetime import UTC, datetime
from xml.etree import ElementTree

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from PIL import Image, ImageColor

from issuance import images, pages
from issuance.domain import DisplayStatus
from issuance.keys import SigningKey
from issuance.pages import STATUS_COLOUR
from issuance.proofs import signed_json

from . import test_proofs

ISSUED = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)


def decoded(png: bytes) -> Image.Image:
    # The header as the PNG specification lays it out, read without Pillow...
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    # ...and the whole image decoded.
    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size == (width, height)
    return image


def near(colour: tuple[int, ...], expected: str, tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, ImageColor.getrgb(expected), strict=False))


@pytest.mark.parametrize("status", list(DisplayStatus))
def test_the_share_card_is_a_1200_by_630_png_showing_the_status(status: DisplayStatus) -> None:
    card = decoded(
        images.share_card_png("Data Analysis", "Northwind University", "Ada Lovelace", ISSUED, status)
    )

    assert (card.format, card.size, card.mode) == ("PNG", images.CARD_SIZE, "RGB")
    assert near(card.getpixel((10, 10)), "#f4f5f7")  # type: ignore[arg-type]  # RGB: a tuple
    assert near(card.getpixel((274, 120)), "#d9a520")  # type: ignore[arg-type]  # the seal's gold ring
    pill = card.crop((530, images.CARD_SIZE[1] - 130, 560, images.CARD_SIZE[1] - 76))
    colours = [colour for _, colour in pill.getcolors(maxcolors=4096) or [] if isinstance(colour, tuple)]
    assert any(near(colour, STATUS_COLOUR[status]) for colour in colours)


def test_the_badge_is_a_square_png_with_a_transparent_background() -> None:
    badge = decoded(images.badge_png("Data Analysis", "Northwind University"))

    assert (badge.size, badge.mode) == ((images.BADGE_SIZE, images.BADGE_SIZE), "RGBA")
    assert badge.getpixel((0, 0))[3] == 0  # type: ignore[index]  # RGBA: a tuple
    assert badge.getpixel((images.BADGE_SIZE // 2, images.BADGE_SIZE // 2))[3] == 255  # type: ignore[index]


@pytest.mark.parametrize(
    "name",
    [
        "A" * 300,
        "word " * 3000,  # cut to MAX_TEXT before it is laid out
        "An achievement name long enough to need wrapping over more lines than the card has room for",
        "Datenanalyse mit Python: Grundlagen für Einsteigerinnen und Einsteiger",
        "数据分析基础",  # no glyphs in the bundled font: boxes, not a failure
        "",
    ],
)
def test_any_text_makes_an_image(name: str) -> None:
    card = decoded(
        images.share_card_png(name, name or "Issuer", name or "Learner", ISSUED, DisplayStatus.VALID)
    )
    badge = decoded(images.badge_png(name, name))

    assert card.size == images.CARD_SIZE
    assert badge.size == (images.BADGE_SIZE, images.BADGE_SIZE)


def test_an_image_is_drawn_once_for_the_same_inputs() -> None:
    first = images.share_card_png("Cached", "Issuer", "Learner", ISSUED, DisplayStatus.VALID)
    again = images.share_card_png("Cached", "Issuer", "Learner", ISSUED, DisplayStatus.VALID)
    revoked = images.share_card_png("Cached", "Issuer", "Learner", ISSUED, DisplayStatus.REVOKED)

    assert again is first
    assert revoked != first


def test_a_baked_badge_carries_the_credential_to_an_independent_verifier() -> None:
    # openbadgeslib extracts it (its OB 3.0 carriers) and checks its proof (its own eddsa-rdfc-2022).
    from openbadgeslib.ob3.ldp import verify_data_integrity_proof
    from openbadgeslib.ob3.verifier import OB3Verifier

    key = SigningKey("key-20261206", Ed25519PrivateKey.generate(), ISSUED)
    unsigned = {**test_proofs.credential(), "name": 'Data Analysis ]]> <b>"&</b>'}
    signed = signed_json(unsigned, key, verification_method=test_proofs.METHOD, created=ISSUED)
    public_pem = key.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)

    png = images.baked_png(images.badge_png("Data Analysis", "Northwind University"), signed)
    svg = pages.baked_svg("Data Analysis", "Northwind University", signed).encode()

    assert decoded(png).size == (images.BADGE_SIZE, images.BADGE_SIZE)  # still an image
    root = ElementTree.fromstring(svg)  # noqa: S314  (our own SVG: still well-formed XML)
    assert root[0].tag == "{https://purl.imsglobal.org/ob/v3p0}credential"  # first, as §5.3 places it
    for carried in (OB3Verifier.extract_token_from_png(png), OB3Verifier.extract_token_from_svg(svg)):
        assert json.loads(carried) == json.loads(signed)
        verify_data_integrity_proof(json.loads(carried), public_pem)  # raises unless it verifies


def test_a_baked_svg_stays_well_formed_whatever_the_credential_holds() -> None:
    # U+FFFE is a JSON string character that XML does not allow: it travels as a JSON escape.
    from openbadgeslib.ob3.verifier import OB3Verifier

    credential = json.dumps({"name": "\ufffe\uffff ]]> ]]]]> <![CDATA[ &amp;"}, ensure_ascii=False)
    svg = pages.baked_svg("Data Analysis", "Northwind University", credential).encode()

    ElementTree.fromstring(svg)  # noqa: S314  (our own SVG: still well-formed XML)
    assert json.loads(OB3Verifier.extract_token_from_svg(svg)) == json.loads(credential)
