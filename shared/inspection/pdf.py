"""PDFs: reading the structure with pypdf under tight limits, and the walk that finds
active content (JavaScript, launch actions, embedded files, rich media, XFA forms)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import struct
import zlib
from contextlib import AbstractContextManager
from typing import Any, BinaryIO, Final

from pypdf import PasswordType, PdfReader
from pypdf.errors import DependencyError, LimitReachedError, PyPdfError
from pypdf.generic import ArrayObject, DictionaryObject, IndirectObject

from shared.inspection.errors import InvalidDocument

# The package's name, as when this was one module: log records keep their logger name.
log = logging.getLogger("shared.inspection")

# Reasons shown to users. The "corrupt PDF" prefix predates the inspection's hardening and
# is matched by clients and tests, so it is kept.
_PDF_JAVASCRIPT: Final = "PDF contains JavaScript"
_PDF_LAUNCH: Final = "PDF launches external programs"
_PDF_EMBEDDED: Final = "PDF has embedded files"
_PDF_XFA: Final = "PDF contains an XFA form"
_PDF_RICH_MEDIA: Final = "PDF contains rich media (Flash, video or 3D)"
_PDF_ENCRYPTED: Final = "encrypted PDF cannot be inspected"
_PDF_TOO_COMPLEX: Final = "PDF is too complex to inspect"
_PDF_UNSUPPORTED: Final = "PDF uses a feature that cannot be inspected"

# What pypdf may inflate while reading the structure (cross-reference and object streams;
# content streams are never decoded). Legitimate object streams are well under 1 MiB.
_PDF_MAX_DECODED: Final = 16 * 1024 * 1024
# Objects read while looking for active content; a document needing more is refused
# rather than inspected for an unbounded time.
_PDF_WALK_BUDGET: Final = 200_000
_PDF_WALK_CACHED: Final = 1_000  # of those, how many pypdf may keep cached at a time
# Object streams: pypdf decodes the whole stream (up to _PDF_MAX_DECODED) to read one of
# its objects, and keeps it and every object parsed from it. A hostile file points into
# many such streams: the walk lets go of them past this many decoded bytes held, and
# refuses a document whose walk would decode more than the second figure in all.
# References pypdf cannot find where the cross-reference table says: it then searches the
# whole file for the object, as viewers that rebuild a damaged table find it too (pdf.js
# does), so the walk lets it, for this many distinct objects; a document needing more is
# refused rather than searched once per reference.
_PDF_MAX_REPAIRS: Final = 16
_PDF_OBJSTM_HELD: Final = _PDF_MAX_DECODED
_PDF_OBJSTM_WORK: Final = 2 * _PDF_MAX_DECODED
# pypdf holds every page of the flattened page tree in memory (2-5 KB each), and a page
# costs a hostile file about 50 bytes: this many entries (pages and intermediate nodes) is
# ample for real documents and keeps that memory in the tens of MB.
_PDF_MAX_PAGE_TREE_ENTRIES: Final = 20_000
# Entries of cross-reference streams: pypdf keeps each (2M by default, ~170 bytes apiece);
# a real document of a few thousand pages has tens of thousands of objects.
_PDF_MAX_XREF_ENTRIES: Final = 100_000


def _limited_configuration() -> Any:
    """pypdf's configuration with this inspection's limits (inflate little, since only
    structure is read), made once; None on pypdf < 6.18, whose 75 MB defaults then apply."""
    try:
        from pypdf import Configuration
    except ImportError:
        return None
    wanted: dict[str, Any] = {
        "zlib_maximum_output_length": _PDF_MAX_DECODED,
        "lzw_maximum_output_length": _PDF_MAX_DECODED,
        "run_length_maximum_output_length": _PDF_MAX_DECODED,
        "brotli_maximum_output_length": _PDF_MAX_DECODED,
        "array_based_stream_maximum_output_length": _PDF_MAX_DECODED,
        "stream_decoding_work_maximum_length": 4 * _PDF_MAX_DECODED,
        "page_tree_maximum_entries": _PDF_MAX_PAGE_TREE_ENTRIES,
        # Nothing here sets pypdf's legacy module constants, so it need not look at them
        # again for every reader it opens.
        "disable_legacy_handling": True,
    }
    known = {field.name for field in dataclasses.fields(Configuration)}
    return Configuration(**{k: v for k, v in wanted.items() if k in known})


_LIMITED = _limited_configuration()


def _pdf_limits() -> AbstractContextManager[object]:
    """The limits for this inspection only (a context variable, so other threads and other
    users of pypdf keep theirs)."""
    if _LIMITED is None:
        return contextlib.nullcontext()
    from pypdf import apply_configuration
    return apply_configuration(_LIMITED)


def pdf_metadata(stream: BinaryIO) -> dict[str, Any]:
    try:
        with _pdf_limits():
            stream.seek(0)
            reader = PdfReader(stream, strict=False,
                               xref_stream_maximum_entries=_PDF_MAX_XREF_ENTRIES)
            metadata: dict[str, Any] = {}
            if reader.is_encrypted:
                # Decision: a PDF that opens without a password (an "owner password" only
                # restricts printing or editing) opens without a prompt in every viewer, so
                # it is inspected like any other. One that needs a password cannot be looked
                # into (strings, streams and object streams are encrypted), and accepting it
                # unchecked would let active content through, so it is refused.
                if _decrypt_without_password(reader) == PasswordType.NOT_DECRYPTED:
                    raise InvalidDocument(_PDF_ENCRYPTED)
                metadata["encrypted"] = True
            # Counting pages walks the page tree (dictionaries only); no content stream is
            # decoded, so a stream that would inflate to gigabytes is never inflated.
            walk = _PdfWalk(reader)
            walk.page_tree(_entry(reader.root_object, "/Pages"))
            metadata["pages"] = len(reader.pages)
            reason = _pdf_active_content(reader, walk)
            if reason is not None:
                raise InvalidDocument(reason)
            return metadata
    except InvalidDocument:
        raise
    except (LimitReachedError, MemoryError) as exc:
        raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: {exc!r}") from exc
    except NotImplementedError as exc:
        # pypdf reads the encryption dictionary on opening and refuses schemes it lacks
        # (certificate or third-party security handlers), as it does unknown filters.
        raise InvalidDocument(f"{_PDF_UNSUPPORTED}: {exc}") from exc
    # Broken input surfaces from pypdf's parser in many shapes, asserts included. Stream
    # failures of the decrypting view (EnvelopeError) are none of these and propagate.
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            AssertionError, RecursionError, OverflowError, struct.error, zlib.error) as exc:
        raise InvalidDocument(f"corrupt PDF: {exc}") from exc


def _decrypt_without_password(reader: PdfReader) -> PasswordType:
    try:
        return reader.decrypt("")
    except (DependencyError, NotImplementedError) as exc:
        # An encryption scheme pypdf cannot handle is one we cannot inspect.
        log.info("PDF encryption not supported: %s", exc)
        return PasswordType.NOT_DECRYPTED


class _PdfWalk:
    """Visits PDF objects at most once per role, within a budget, resolving references
    lazily; a reference loop or a huge structure therefore cannot keep it busy."""

    def __init__(self, reader: PdfReader) -> None:
        self._reader = reader
        self._budget = _PDF_WALK_BUDGET
        self._seen: set[tuple[str, int, int]] = set()
        self.todo: list[tuple[str, Any]] = []
        # pypdf keeps every object it reads (a few KB each once parsed); the walk drops what
        # it added every so often, so memory does not grow with the number of objects.
        self._cache: dict[tuple[Any, Any], Any] = reader.resolved_objects
        self._added: list[tuple[Any, Any]] = []
        self._reads = 0  # since pypdf's cache was last let go of
        self._repairs: set[tuple[int, int]] = set()
        self._objstm_held = 0  # decoded bytes of the object streams in pypdf's cache
        self._objstm_work = 0  # decoded bytes of object streams, in all
        self._keep_cache = False  # reading the page tree, whose pages pypdf keeps anyway

    def open(self, role: str, value: Any) -> Any:
        """The object ``value`` refers to, or None if it was already visited in this role."""
        if not isinstance(value, IndirectObject):
            return value  # already parsed as part of its container: nothing to read
        key = (role, value.idnum, value.generation)
        if key in self._seen:
            return None
        self._seen.add(key)
        return self._read(value)

    def leaf(self, value: Any) -> Any:
        """A name or string, resolved however often it was read before: one name object may
        stand for a harmless annotation subtype and for an action's type alike, so leaves
        are never skipped as seen (each read is charged all the same)."""
        if not isinstance(value, IndirectObject):
            return value
        return self._read(value)

    def charge(self, count: int) -> None:
        # Reading objects and looking at array elements cost time; one budget bounds both.
        self._budget -= count
        if self._budget < 0:
            raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: more than {_PDF_WALK_BUDGET} objects")

    def _read(self, value: IndirectObject) -> Any:
        self.charge(1)
        if ((value.generation, value.idnum) not in self._cache
                and not _findable(self._reader, value)):
            # Not null, as a table taken at its word would say: a viewer that rebuilds the
            # table finds an object that is in the file but not (rightly) in the table, and
            # active content hidden there must be found too. pypdf searches for it.
            key = (value.idnum, value.generation)
            if key in self._repairs:
                return None  # searched for once already, in vain (found, it is findable)
            self._repairs.add(key)
            if len(self._repairs) > _PDF_MAX_REPAIRS:
                raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: more than {_PDF_MAX_REPAIRS} "
                                      "objects are not where its cross-reference table says")
        # Counted in reads, not in objects cached: one read from an object stream caches
        # all of its objects, and letting go of them at every later read would decode the
        # stream again each time.
        self._reads += 1
        if ((self._reads >= _PDF_WALK_CACHED and not self._keep_cache)
                or self._objstm_held > _PDF_OBJSTM_HELD):
            self._let_go()
        held = len(self._cache)
        container = self._reader.xref_objStm.get(value.idnum)
        decoded = container is None or (0, container[0]) in self._cache
        obj = value.get_object()
        # What pypdf cached on the way: the object, or for one in an object stream the
        # stream and every object in it (dictionaries keep their insertion order).
        self._added.extend(itertools.islice(reversed(self._cache), len(self._cache) - held))
        if container is not None and not decoded:
            stream = self._cache.get((0, container[0]))
            size = len(stream.get_data()) if stream is not None else 0  # cached: not again
            self._objstm_held += size
            self._objstm_work += size
            if self._objstm_work > _PDF_OBJSTM_WORK:
                raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: its object streams decode to more "
                                      f"than {_PDF_OBJSTM_WORK} bytes")
        return obj

    def _let_go(self) -> None:
        # Objects still in use stay alive through their references; only pypdf's cache
        # lets go of them (it reads them again if ever asked).
        for cached in self._added:
            self._cache.pop(cached, None)
        self._added.clear()
        self._reads = 0
        self._objstm_held = 0

    def dictionary(self, role: str, value: Any) -> DictionaryObject | None:
        obj = self.open(role, value)
        return obj if isinstance(obj, DictionaryObject) else None

    def items(self, role: str, value: Any) -> list[Any]:
        """The elements of an array (or the single object where one is allowed)."""
        obj = self.open(role, value)
        if isinstance(obj, ArrayObject):
            self.charge(len(obj))  # inline elements cost no read, but each is looked at
            return list(obj)
        return [] if obj is None else [obj]

    def page_tree(self, root: Any) -> None:
        """Read the page tree before pypdf flattens it. pypdf searches the whole file for
        every page whose cross-reference entry is wrong (15,000 such pages fit in 1 MiB,
        a search of it each: minutes); read here first, they count against the walk's
        repairs, and pypdf then finds them in its cache, which is kept meanwhile (pypdf
        keeps the pages anyway). Kids that are neither dictionaries nor references are
        skipped, as pypdf skips them; a tree with more entries than pypdf allows is refused
        here, before pypdf reads what the walk did not."""
        nodes = [root]
        entries = 0
        self._keep_cache = True
        try:
            while nodes:
                node = self.dictionary("pages", nodes.pop())
                if node is None:
                    continue
                kids = [kid for kid in self.items("pages/Kids", _entry(node, "/Kids"))
                        if isinstance(kid, IndirectObject | DictionaryObject)]
                entries += len(kids)
                if entries > _PDF_MAX_PAGE_TREE_ENTRIES:
                    raise InvalidDocument(f"{_PDF_TOO_COMPLEX}: more than "
                                          f"{_PDF_MAX_PAGE_TREE_ENTRIES} page tree entries")
                nodes.extend(kids)
        finally:
            self._keep_cache = False

    def tree_has_entries(self, role: str, value: Any) -> bool:
        """Whether a name tree (/JavaScript, /EmbeddedFiles) holds at least one entry."""
        nodes = [value]
        while nodes:
            node = self.dictionary(role, nodes.pop())
            if node is None:
                continue
            if self.items(role + "/Names", _entry(node, "/Names")):
                return True
            nodes.extend(self.items(role + "/Kids", _entry(node, "/Kids")))
        return False

    def drain(self) -> str | None:
        """Check everything queued; the reason to reject, if any."""
        while self.todo:
            role, value = self.todo.pop()
            if role == "action":
                for item in self.items("action-list", value):
                    reason = self._action(item)
                    if reason is not None:
                        return reason
            elif role == "triggers":  # /AA: trigger name -> action
                triggers = self.dictionary(role, value)
                if triggers is not None:
                    self.todo.extend(("action", _entry(triggers, key)) for key in triggers)
            elif role == "annots":
                self.todo.extend(("annot", item) for item in self.items(role, value))
            elif role == "files":  # /AF: associated files (PDF 2.0)
                for item in self.items(role, value):
                    spec = self.dictionary("filespec", item)
                    if spec is not None and "/EF" in spec:
                        return _PDF_EMBEDDED
            else:
                reason = self._node(role, value)
                if reason is not None:
                    return reason
        return None

    def _node(self, role: str, value: Any) -> str | None:
        node = self.dictionary(role, value)
        if node is None:
            return None
        if role == "annot":
            subtype = self.leaf(_entry(node, "/Subtype"))
            if subtype == "/FileAttachment":
                return _PDF_EMBEDDED
            if subtype in ("/RichMedia", "/3D"):
                return _PDF_RICH_MEDIA
            # A widget's field may carry actions without being listed in /AcroForm.
            self.todo.append(("field", _entry(node, "/Parent")))
        elif role == "field":
            self.todo.extend(("field", kid) for kid in self.items("kids", _entry(node, "/Kids")))
        elif role == "outline":  # bookmarks: siblings by /Next, children by /First
            self.todo.append(("outline", _entry(node, "/Next")))
            self.todo.append(("outline", _entry(node, "/First")))
        self.todo.append(("action", _entry(node, "/A")))
        self.todo.append(("triggers", _entry(node, "/AA")))
        return None

    def _action(self, value: Any) -> str | None:
        action = self.dictionary("action", value)
        if action is None:
            return None  # absent, already checked, or a destination array
        kind = self.leaf(_entry(action, "/S"))
        if kind in ("/JavaScript", "/JS") or "/JS" in action:  # also a Rendition's /JS
            return _PDF_JAVASCRIPT
        if kind == "/Launch":
            return _PDF_LAUNCH
        if kind == "/RichMediaExecute":
            return _PDF_RICH_MEDIA
        if kind == "/URI" and _is_javascript_uri(self.leaf(_entry(action, "/URI"))):
            return _PDF_JAVASCRIPT
        self.todo.append(("action", _entry(action, "/Next")))  # an action or an array
        return None


def _findable(reader: PdfReader, ref: IndirectObject) -> bool:
    """Whether pypdf finds ``ref`` where the cross-reference table says: in an object
    stream (generation 0 only, as pypdf looks there), or at an offset whose object header
    names it. For any other reference pypdf reads and searches the whole file."""
    if ref.generation == 0 and ref.idnum in reader.xref_objStm:
        return True
    start = reader.xref.get(ref.generation, {}).get(ref.idnum)
    if start is None:
        return False
    if reader.xref_free_entry.get(ref.generation, {}).get(ref.idnum, False):
        return True  # pypdf answers null at once
    try:
        reader.stream.seek(start)
        return bool(reader.read_object_header(reader.stream) == (ref.idnum, ref.generation))
    except (PyPdfError, ValueError):
        return False


def _entry(dictionary: DictionaryObject, key: str) -> Any:
    """The raw (unresolved) value of ``key``, or None; pypdf's raw_get raises when absent."""
    return dict.get(dictionary, key)


def _is_javascript_uri(uri: Any) -> bool:
    if isinstance(uri, bytes):
        uri = uri.decode("latin-1")
    if not isinstance(uri, str):
        return False
    # Browsers ignore leading whitespace and control characters before the scheme.
    return uri.lstrip("".join(map(chr, range(33)))).lower().startswith("javascript:")


def _pdf_active_content(reader: PdfReader, walk: _PdfWalk) -> str | None:
    """Why the document must be refused for active content, or None.

    Only the latest revision's structure is walked, reachable from the catalog, as viewers
    do: the name trees, the document and page actions, annotations, form fields, bookmarks
    and associated files. Content streams are never read.
    """
    root = reader.root_object
    names = walk.dictionary("names", _entry(root, "/Names"))
    if names is not None:
        if walk.tree_has_entries("javascript", _entry(names, "/JavaScript")):
            return _PDF_JAVASCRIPT
        if walk.tree_has_entries("embedded", _entry(names, "/EmbeddedFiles")):
            return _PDF_EMBEDDED
    form = walk.dictionary("acroform", _entry(root, "/AcroForm"))
    if form is not None:
        if "/XFA" in form:
            return _PDF_XFA
        walk.todo.extend(("field", field) for field in walk.items("fields",
                                                                  _entry(form, "/Fields")))
    walk.todo.append(("action", _entry(root, "/OpenAction")))
    walk.todo.append(("triggers", _entry(root, "/AA")))
    walk.todo.append(("files", _entry(root, "/AF")))
    outlines = walk.dictionary("outlines", _entry(root, "/Outlines"))
    if outlines is not None:
        walk.todo.append(("outline", _entry(outlines, "/First")))
    reason = walk.drain()
    pages_seen: set[int] = set()
    for page in reader.pages:
        if reason is not None:
            break
        # A page tree may list one page object many times: its annotations are the same.
        ref = page.indirect_reference
        if ref is not None:
            if ref.idnum in pages_seen:
                continue
            pages_seen.add(ref.idnum)
        walk.todo.append(("triggers", _entry(page, "/AA")))
        walk.todo.append(("annots", _entry(page, "/Annots")))
        walk.todo.append(("files", _entry(page, "/AF")))
        reason = walk.drain()
    return reason
