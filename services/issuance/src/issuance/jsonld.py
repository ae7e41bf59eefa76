"""JSON-LD to RDFC-1.0 canonical N-Quads, offline: what a Data Integrity proof signs.

The pipeline is pyld (JSON-LD expansion and conversion to RDF) followed by pyoxigraph (RDFC-1.0
canonicalisation and N-Quads serialisation). pyld also implements URDNA2015 (the same algorithm
as RDFC-1.0), but its N-Quads serialiser escapes the control characters U+0000-U+0008, U+000B,
U+000C, U+000E-U+001F and U+007F the URDNA2015-era way, so a credential whose text holds one of
them would hash differently from every RDFC-1.0 implementation (jsonld.js/rdf-canonize,
oxigraph); and its first-degree hash counts a quad naming a blank node twice (``_:x <p> _:x``)
twice, where RDFC-1.0 hashes the set of quads mentioning the node, which can reorder the canonical
labels. pyld's output is therefore never hashed: its RDF terms are handed to pyoxigraph as
objects, and pyoxigraph canonicalises and writes the canonical text.

Three departures from a bare ``jsonld.to_rdf`` make the conversion lossless or refuse it, the way
jsonld.js' "safe mode" (which Data Integrity implementations use) does: a property with no
definition in the context, or an ``@id``/``@type`` that is not an absolute IRI, would otherwise be
dropped silently and left unsigned. pyld also resolves relative IRIs against a made-up base
(``http://example.org/base/``); no base is used here, so they are caught instead.

Contexts come only from the openbadgeslib package (pinned, byte-checked copies): nothing is ever
fetched, which also rules out SSRF through a crafted ``@context``.
"""

from __future__ import annotations

import copy
import math
import re
import secrets
import threading
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Final, TypeVar

import pyoxigraph as ox
from openbadgeslib.ob3.contexts import load_context
from pyld import jsonld as pyld
from pyld.context_resolver import ContextResolver

VC_V2: Final = "https://www.w3.org/ns/credentials/v2"
OB_V3: Final = "https://purl.imsglobal.org/spec/ob/v3p0/context-3.0.3.json"

# The subset of openbadgeslib's allowlist that names what its URL serves. Left out: the unversioned
# OB ".../context.json" (openbadgeslib aliases it to 3.0.3, which is not what 1EdTech serves there)
# and CLR 2.0 (not a credential this service mints or verifies).
_BUNDLED_URLS: Final = (
    VC_V2,
    "https://purl.imsglobal.org/spec/ob/v3p0/context-3.0.1.json",
    "https://purl.imsglobal.org/spec/ob/v3p0/context-3.0.2.json",
    OB_V3,
    "https://purl.imsglobal.org/spec/ob/v3p0/extensions.json",
    "https://w3id.org/security/data-integrity/v2",
    "https://w3id.org/security/multikey/v1",
)
# Private deep copies: openbadgeslib hands the same cached dicts to every caller, and pyld keeps
# references to these objects in its context caches, so nobody else may hold them.
_CONTEXTS: Final[dict[str, dict[str, Any]]] = {url: copy.deepcopy(load_context(url)) for url in _BUNDLED_URLS}

SUPPORTED_CONTEXTS: Final = frozenset(_CONTEXTS)

DocumentLoader = Callable[[str, dict[str, Any] | None], dict[str, Any]]
_E = TypeVar("_E", bound=BaseException)


class CanonicalizationError(ValueError):
    """The document cannot be turned into RDF without losing or inventing data."""


class ContextNotAvailable(CanonicalizationError):
    """The document names a JSON-LD context that is not bundled (contexts are never fetched)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"JSON-LD context {url!r} is not bundled; contexts are never fetched")
        self.url = url


def document_loader(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """pyld document loader serving only the bundled contexts (see ``SUPPORTED_CONTEXTS``).

    Any other URL raises ``ContextNotAvailable``; there is no network access, ever.
    """
    try:
        document = _CONTEXTS[url]
    except KeyError:
        raise ContextNotAvailable(url) from None
    # tag "static" tells pyld the document never changes for this URL, so it may keep the
    # resolved (and, for the top-level context, processed) context across calls: ~20% per call.
    return {
        "contentType": "application/ld+json",
        "contextUrl": None,
        "documentUrl": url,
        "document": document,
        "tag": "static",
    }


def canonicalize(document: dict[str, Any], *, loader: DocumentLoader | None = None) -> str:
    """RDFC-1.0 canonical N-Quads of a JSON-LD document (sorted lines, each ending in "\\n").

    With the bundled contexts (``loader`` omitted) a cache of RDF templates, one per document
    shape, skips JSON-LD processing for documents shaped like one seen before; it is property-tested
    to give exactly what ``canonical_nquads(to_dataset(document))`` gives. A custom ``loader``
    (tests) always takes the full path.

    Raises ``ContextNotAvailable`` for a context that is not bundled, ``CanonicalizationError``
    when the document would lose data in conversion (undefined term, relative IRI) or holds
    something RDF cannot carry (an IRI or language tag that is not well formed).
    """
    if loader is None:
        try:
            return _templates.canonicalize(document)
        except (_NotTemplatable, RecursionError):
            pass
    return canonical_nquads(to_dataset(document, loader=loader))


def to_dataset(document: dict[str, Any], *, loader: DocumentLoader | None = None) -> ox.Dataset:
    """The RDF dataset of a JSON-LD document, refusing lossy conversions (see ``canonicalize``)."""
    return _to_ox_dataset(_to_rdf(document, loader or document_loader))


def canonical_nquads(dataset: ox.Dataset) -> str:
    """Canonicalise ``dataset`` in place with RDFC-1.0 and return its canonical N-Quads text.

    Raises ``CanonicalizationError`` for a dataset whose blank nodes would make RDFC-1.0 run for
    more than a fraction of a second (see ``_check_canonicalization_work``).
    """
    _check_canonicalization_work(dataset)
    return _canonical_text(dataset)


def _canonical_text(dataset: ox.Dataset) -> str:
    dataset.canonicalize(ox.CanonicalizationAlgorithm.RDFC_1_0)
    serialized = ox.serialize(dataset, format=ox.RdfFormat.N_QUADS)
    assert serialized is not None  # None only when writing to a file
    text = serialized.decode()
    # pyoxigraph writes quads in storage order; RDFC-1.0 wants code-point order. Split on "\n"
    # only: str.splitlines() also splits on U+0085, U+2028, U+001C..U+001E, which N-Quads
    # leaves unescaped inside literals.
    return "".join(sorted(line + "\n" for line in text.split("\n") if line))


# RDFC-1.0 is exponential on "poison" graphs, and a verifier canonicalises before it knows the
# signature is any good; oxigraph has no work limit (a clique of 9 blank nodes, a few hundred bytes
# of JSON-LD, takes 30 s; 10 take minutes). The cost comes only from blank nodes whose first-degree
# hashes collide ("ambiguous") and that are linked to one another: RDFC-1.0 gives every other blank
# node its canonical id up front, and its Hash N-Degree Quads recursion only permutes and descends
# into ambiguous neighbours. So the work is bounded by the connected groups of ambiguous blank
# nodes: each costs about (its size)! (measured: a 6-clique 20 ms, a 7-clique 0.2 s). Real
# credentials are trees of distinct blank nodes: their groups have one or two nodes.
_MAX_CANONICALIZATION_WORK = 5040  # 7!: one 7-clique, ~0.2 s


def _check_canonicalization_work(dataset: ox.Dataset) -> None:
    quads_of = _linked_blank_nodes(list(dataset))
    if not quads_of:
        return

    # RDFC-1.0 first-degree hash input: the node's quads, itself as _:a, other blank nodes as _:z.
    # A node with no blank neighbour has no _:z, so cannot share a hash with a linked one.
    def first_degree(node: ox.BlankNode) -> tuple[str, ...]:
        return tuple(
            sorted(
                " ".join(
                    ("_:a" if term == node else "_:z") if isinstance(term, ox.BlankNode) else str(term)
                    for term in (quad.subject, quad.predicate, quad.object, quad.graph_name)
                )
                for quad in quads_of[node]
            )
        )

    by_hash: dict[tuple[str, ...], list[ox.BlankNode]] = {}
    for node in quads_of:
        by_hash.setdefault(first_degree(node), []).append(node)
    ambiguous = {node for nodes in by_hash.values() if len(nodes) > 1 for node in nodes}
    if _canonicalization_work(quads_of, ambiguous) > _MAX_CANONICALIZATION_WORK:
        raise CanonicalizationError(
            "too many interlinked indistinguishable blank nodes: canonicalisation work over the limit"
        )


def _linked_blank_nodes(quads: list[ox.Quad]) -> dict[ox.BlankNode, set[ox.Quad]]:
    """The blank nodes a quad links to another blank node, each with every quad naming it."""
    quads_of: dict[ox.BlankNode, set[ox.Quad]] = {}
    for quad in quads:
        blank = [
            term for term in (quad.subject, quad.object, quad.graph_name) if isinstance(term, ox.BlankNode)
        ]
        if len(blank) > 1:  # only blank nodes linked to blank nodes can cost more than linear time
            for node in blank:
                quads_of.setdefault(node, set()).add(quad)
    if quads_of:
        for quad in quads:  # the linked nodes' other quads, which their first-degree hashes cover
            for term in (quad.subject, quad.object, quad.graph_name):
                if isinstance(term, ox.BlankNode) and term in quads_of:
                    quads_of[term].add(quad)
    return quads_of


def _canonicalization_work(quads_of: dict[ox.BlankNode, set[ox.Quad]], ambiguous: set[ox.BlankNode]) -> int:
    """The sum of (size)! over the connected groups of ``ambiguous`` nodes, given up on once over
    the limit. Whether it is over the limit only grows with ``ambiguous``: groups merge, and
    (a + b)! >= a! + b!."""
    work, seen = 0, set[ox.BlankNode]()
    for start in ambiguous:
        if start in seen:
            continue
        seen.add(start)
        group, stack = 0, [start]
        while stack:
            node = stack.pop()
            group += 1
            for quad in quads_of[node]:
                for term in (quad.subject, quad.object, quad.graph_name):
                    if isinstance(term, ox.BlankNode) and term in ambiguous and term not in seen:
                        seen.add(term)
                        stack.append(term)
        work += math.factorial(min(group, 20)) if group > 1 else 0
        if work > _MAX_CANONICALIZATION_WORK:
            break
    return work


# --------------------------------------------------------------------------------------------
# Full path: pyld expansion + conversion, pyoxigraph terms.

# pyld's own test for "absolute IRI" (pyld.jsonld._is_absolute_iri): what it keeps in toRdf.
_PYLD_ABSOLUTE_IRI = re.compile(r"([A-Za-z][A-Za-z0-9+-.]*|_):\S*")
_THREAD = threading.local()
_MAX_CACHED_CONTEXTS = 100  # pyld's own bound for its process-wide cache


class _ResolvedContexts(dict[str, Any]):
    """A bounded stand-in for pyld's resolved-context cache (pyld only calls get and setitem).

    pyld's own cache is a process-wide, non-thread-safe LRU; concurrent calls corrupt it (see
    openbadgeslib's _canon_guard.py for the measurements), and FastAPI runs sync handlers in a
    thread pool. So each thread gets its own, and inline contexts of hostile documents (cached
    by their text) cannot grow it without bound.
    """

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self and len(self) >= _MAX_CACHED_CONTEXTS:
            del self[next(iter(self))]
        super().__setitem__(key, value)


def _context_resolver(loader: DocumentLoader) -> ContextResolver:
    if loader is not document_loader:
        # A cache keyed by URL must not serve another loader's document for the same URL.
        return ContextResolver({}, loader)
    cache = getattr(_THREAD, "contexts", None)
    if cache is None:
        cache = _THREAD.contexts = _ResolvedContexts()
    return ContextResolver(cache, loader)


class _LosslessProcessor(pyld.JsonLdProcessor):  # type: ignore[misc]  # pyld is untyped
    """pyld's processor, refusing the conversions jsonld.js' safe mode refuses."""

    def __init__(self) -> None:
        self.dropped: list[str | None] = []
        super().__init__(on_property_dropped=self.dropped.append)

    def expand(self, input_: Any, options: dict[str, Any]) -> Any:
        # toRdf expands first; checking here avoids a second pass over the document.
        expanded = super().expand(input_, options)
        if self.dropped:
            raise CanonicalizationError(
                f"properties not defined by the context would be dropped: {self.dropped}"
            )
        _check_absolute_iris(expanded)
        return expanded


def _to_rdf(document: dict[str, Any], loader: DocumentLoader) -> dict[str, list[dict[str, Any]]]:
    options = {"documentLoader": loader, "base": None, "contextResolver": _context_resolver(loader)}
    try:
        dataset: dict[str, list[dict[str, Any]]] = _LosslessProcessor().to_rdf(document, options)
    except BaseException as error:
        # An interrupted call (a signal, a timeout) may leave the thread's cache half-updated.
        _THREAD.contexts = None
        if not isinstance(error, Exception):
            raise
        refused = _cause(error, CanonicalizationError)  # ContextNotAvailable included
        if refused is not None:
            raise refused from None
        raise CanonicalizationError(f"not valid JSON-LD: {error}") from error
    return dataset


def _cause(error: BaseException, kind: type[_E]) -> _E | None:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _check_absolute_iris(expanded: Any) -> None:
    """Refuse node ids and types that toRdf would drop (relative IRIs): jsonld.js safe mode."""
    stack = [expanded]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if "@value" in item:  # a literal: its @type is a datatype, its @value may be JSON
                datatype = item.get("@type")
                if isinstance(datatype, str) and datatype != "@json":
                    _require_absolute(datatype)
                continue
            node_id = item.get("@id")
            if isinstance(node_id, str):
                _require_absolute(node_id)
            for type_ in item.get("@type", ()):
                _require_absolute(type_)
            stack.extend(value for key, value in item.items() if key not in ("@id", "@type"))


def _require_absolute(iri: str) -> None:
    if not _PYLD_ABSOLUTE_IRI.fullmatch(iri):
        raise CanonicalizationError(f"{iri!r} is not an absolute IRI: it would be dropped unsigned")


def _to_ox_dataset(dataset: dict[str, list[dict[str, Any]]]) -> ox.Dataset:
    quads = []
    try:
        for graph_name, triples in dataset.items():
            graph: ox.NamedNode | ox.BlankNode | ox.DefaultGraph
            if graph_name == "@default":
                graph = ox.DefaultGraph()
            elif graph_name.startswith("_:"):
                graph = ox.BlankNode(graph_name[2:])
            else:
                graph = ox.NamedNode(graph_name)
            for triple in triples:
                subject = _ox_term(triple["subject"])
                assert not isinstance(subject, ox.Literal)
                predicate = ox.NamedNode(triple["predicate"]["value"])
                quads.append(ox.Quad(subject, predicate, _ox_term(triple["object"]), graph))
    except ValueError as error:  # oxigraph checks IRIs (RFC 3987) and language tags (BCP 47)
        raise CanonicalizationError(f"not representable in RDF: {error}") from error
    return ox.Dataset(quads)


def _ox_term(term: dict[str, str]) -> ox.NamedNode | ox.BlankNode | ox.Literal:
    kind, value = term["type"], term["value"]
    if kind == "IRI":
        return ox.NamedNode(value)
    if kind == "blank node":
        return ox.BlankNode(value[2:])
    language = term.get("language")
    if language:  # pyld has already lower-cased it, as jsonld.js does
        return ox.Literal(value, language=language)
    return ox.Literal(value, datatype=ox.NamedNode(term["datatype"]))


# --------------------------------------------------------------------------------------------
# Fast path: one RDF template per document shape.
#
# Credentials minted from the same code differ in their string values, not in their structure.
# A template is the RDF of the document with every variable string replaced by a unique
# placeholder IRI, converted once by the full path; a later document of the same shape only
# substitutes its strings into the template's quads and runs RDFC-1.0 (blank node labels are never
# templated: they depend on the values).
#
# Why the result is exactly the full path's:
# * JSON-LD turns a string in a given position into RDF according to the active context at that
#   position, which the shape (keys, types, contexts, structure) fixes: the string's content
#   matters only where it is IRI-expanded (@id, "@type": "@id"/"@vocab" terms). Each placeholder is
#   classified by where it comes out: a literal slot takes any string verbatim; an IRI slot takes a
#   value only if pyld would keep it verbatim (an absolute IRI whose scheme and whole text are no
#   term of any context in play, so neither compact-IRI nor term expansion applies); anything else
#   falls back to the full path.
# * Values that are not plain strings, type values, keys and keywords are part of the shape.
# * Two IRI values that turn out equal merge their nodes in JSON-LD; the merged node's triples
#   are the union of the two, which is what the template gives once the dataset drops duplicates.
# * A placeholder that comes out transformed (inside a longer literal, as a language tag, ...) or
#   not at all makes the shape untemplatable; it then always takes the full path.

_MAX_TEMPLATES = 256
# A string under one of these keys changes how the rest is read (types choose type-scoped
# contexts; proofPurpose is a "@vocab" term whose values are relative): part of the shape.
_SHAPE_KEYS: Final = frozenset({"type", "proofPurpose"})
_VARIABLE_KEYWORDS: Final = frozenset({"@id", "@value"})
# An IRI slot value pyld keeps verbatim and oxigraph accepts: no whitespace (Python's \s is
# pyld's test), no control characters, none of the characters RFC 3987 excludes.
_TEMPLATE_IRI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:[^\s\x00-\x20\x7f<>\"{}|\\^`]*")
_VARIABLE: Final = object()


class _NotTemplatable(Exception):
    pass


def _is_variable_key(key: str) -> bool:
    return key in _VARIABLE_KEYWORDS if key.startswith("@") else key not in _SHAPE_KEYS


def _shape(item: Any, variable: bool, values: list[str]) -> Hashable:
    """The document with its variable strings left out; those are appended to ``values``. Key
    order is part of the shape: documents built by the same code share it, and not sorting keys
    saves a fifth of the fast path."""
    if isinstance(item, dict):
        return (
            "{",
            tuple(
                (key, _shape(value, key != "@context" and variable and _is_variable_key(key), values))
                for key, value in item.items()
            ),
        )
    if isinstance(item, list):
        return ("[", tuple(_shape(value, variable, values) for value in item))
    if variable and isinstance(item, str):
        values.append(item)
        return _VARIABLE
    return (type(item).__name__, item)


def _fill(item: Any, variable: bool, values: Iterator[str]) -> Any:
    """``item`` with its variable strings replaced by ``values``, in ``_shape``'s order."""
    if isinstance(item, dict):
        return {
            key: _fill(value, key != "@context" and variable and _is_variable_key(key), values)
            for key, value in item.items()
        }
    if isinstance(item, list):
        return [_fill(value, variable, values) for value in item]
    if variable and isinstance(item, str):
        return next(values)
    return item


def _context_terms(document: dict[str, Any]) -> frozenset[str]:
    """Every name defined by any context the document uses, scoped contexts included."""
    terms: set[str] = set()
    stack: list[Any] = [document]
    seen_urls: set[str] = set()
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "@context":
                    for context in value if isinstance(value, list) else [value]:
                        if isinstance(context, str):
                            if context not in seen_urls:
                                seen_urls.add(context)
                                stack.append(document_loader(context)["document"])
                        elif isinstance(context, dict):
                            terms.update(_all_keys(context))
                stack.append(value)
    return frozenset(term.lower() for term in terms)


def _all_keys(item: Any) -> Iterator[str]:
    if isinstance(item, dict):
        for key, value in item.items():
            if not key.startswith("@"):
                yield key
            yield from _all_keys(value)
    elif isinstance(item, list):
        for value in item:
            yield from _all_keys(value)


_Slot = tuple[int, str | None, str | None]  # (value index, datatype, language); datatype None = IRI
_Term = ox.NamedNode | ox.BlankNode | ox.Literal | ox.DefaultGraph | _Slot


class _Template:
    def __init__(self, sample: dict[str, Any], shape: Hashable, count: int) -> None:
        tag = secrets.token_hex(8)
        placeholders = [f"urn:x-microcred-slot-{tag}:{index}" for index in range(count)]
        document = _fill(sample, True, iter(placeholders))
        check: list[str] = []
        if _shape(document, True, check) != shape or check != placeholders:
            raise _NotTemplatable("traversal mismatch")
        try:
            rdf = _to_rdf(document, document_loader)
        except CanonicalizationError as error:
            raise _NotTemplatable(str(error)) from error
        self.terms = _context_terms(document)
        index_of = {placeholder: index for index, placeholder in enumerate(placeholders)}
        self.iri_slots: set[int] = set()
        literal_slots: set[int] = set()

        def term(rdf_term: dict[str, str]) -> _Term:
            value = rdf_term["value"]
            index = index_of.get(value)
            if index is not None:
                if rdf_term["type"] == "IRI":
                    self.iri_slots.add(index)
                    return (index, None, None)
                literal_slots.add(index)
                return (index, rdf_term.get("datatype"), rdf_term.get("language"))
            if any(tag in field for field in rdf_term.values()):
                raise _NotTemplatable(f"a value came out transformed: {value!r}")
            return _ox_term(rdf_term)

        # Quads without a slot are built once; the others are rebuilt per document.
        self.constant_quads: list[ox.Quad] = []
        self.slotted_quads: list[tuple[_Term, _Term, _Term, _Term]] = []
        for graph_name, triples in rdf.items():
            graph: _Term = (
                ox.DefaultGraph()
                if graph_name == "@default"
                else term(
                    {"type": "blank node" if graph_name.startswith("_:") else "IRI", "value": graph_name}
                )
            )
            for triple in triples:
                quad = (term(triple["subject"]), term(triple["predicate"]), term(triple["object"]), graph)
                if any(isinstance(part, tuple) for part in quad):
                    self.slotted_quads.append(quad)
                else:
                    self.constant_quads.append(ox.Quad(*quad))  # type: ignore[arg-type]  # no slot
        self.slots = {part for quad in self.slotted_quads for part in quad if isinstance(part, tuple)}
        # Slots are IRIs and literals, never blank nodes, so which blank nodes a quad links to
        # which is the template's own. If the work check passes with every linked node taken for
        # ambiguous, the most values could make ambiguous, it passes for every document of the
        # shape and is skipped (it was a fifth of the fast path).
        linked = _linked_blank_nodes(list(_to_ox_dataset(rdf)))
        self.needs_work_check = _canonicalization_work(linked, set(linked)) > _MAX_CANONICALIZATION_WORK
        if self.iri_slots & literal_slots or len(self.iri_slots | literal_slots) != count:
            raise _NotTemplatable("a value was dropped or used both as IRI and as literal")

    def canonicalize(self, values: list[str]) -> str:
        for index in self.iri_slots:
            value = values[index]
            scheme = value.partition(":")[0].lower()
            if not _TEMPLATE_IRI.fullmatch(value) or scheme in self.terms or value.lower() in self.terms:
                raise _NotTemplatable(f"{value!r} is not an IRI that JSON-LD keeps verbatim")
        filled: dict[_Slot, ox.NamedNode | ox.Literal] = {}
        try:
            for slot in self.slots:
                index, datatype, language = slot
                if datatype is None:
                    filled[slot] = ox.NamedNode(values[index])
                elif language:
                    filled[slot] = ox.Literal(values[index], language=language)
                else:
                    filled[slot] = ox.Literal(values[index], datatype=ox.NamedNode(datatype))
        except ValueError as error:  # a malformed IRI, a lone surrogate: the full path says why
            raise _NotTemplatable(str(error)) from error
        quads = list(self.constant_quads)
        for quad in self.slotted_quads:
            terms = [filled[part] if isinstance(part, tuple) else part for part in quad]
            quads.append(ox.Quad(*terms))  # type: ignore[arg-type]  # positions hold what pyld put there
        dataset = ox.Dataset(quads)
        return canonical_nquads(dataset) if self.needs_work_check else _canonical_text(dataset)


class _Templates:
    """Templates by document shape, bounded. A shape gets its template on its second sighting, so
    a one-off document (a foreign credential being verified) does not pay for building one; a
    shape that cannot be templated is remembered as such."""

    _SEEN_ONCE: Final = "seen once"
    _UNTEMPLATABLE: Final = "untemplatable"

    def __init__(self) -> None:
        self._by_shape: dict[Hashable, _Template | str] = {}
        self._lock = threading.Lock()

    def canonicalize(self, document: dict[str, Any]) -> str:
        values: list[str] = []
        shape = _shape(document, True, values)
        entry = self._by_shape.get(shape)
        if isinstance(entry, _Template):
            return entry.canonicalize(values)
        if entry is None:
            self._store(shape, self._SEEN_ONCE)
            raise _NotTemplatable("first sighting of this shape")
        if entry == self._UNTEMPLATABLE:
            raise _NotTemplatable("this shape cannot be templated")
        try:
            template = _Template(document, shape, len(values))
        except _NotTemplatable:
            self._store(shape, self._UNTEMPLATABLE)
            raise
        self._store(shape, template)
        return template.canonicalize(values)

    def _store(self, shape: Hashable, entry: _Template | str) -> None:
        with self._lock:
            if shape not in self._by_shape and len(self._by_shape) >= _MAX_TEMPLATES:
                del self._by_shape[next(iter(self._by_shape))]
            self._by_shape[shape] = entry


_templates = _Templates()
