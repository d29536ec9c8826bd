"""The multipart upload's `kind` field: read into memory, so never longer than a kind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from streaming_form_data import StreamingFormDataParser
from streaming_form_data.validators import ValidationError

from functions.documents.upload import _KindField
from shared.documents import KINDS


def _parse(kind: bytes) -> _KindField:
    field = _KindField()
    parser = StreamingFormDataParser(headers={"Content-Type": "multipart/form-data; boundary=B"})
    parser.register("kind", field)
    parser.data_received(b'--B\r\nContent-Disposition: form-data; name="kind"\r\n\r\n' + kind
                         + b"\r\n--B--\r\n")
    return field


def test_every_kind_fits() -> None:
    for kind in KINDS:
        field = _parse(kind.encode())
        assert (field.value, field.started, field.finished) == (kind.encode(), True, True)


def test_a_kind_field_longer_than_any_kind_is_refused_before_it_is_kept() -> None:
    field = _KindField()
    parser = StreamingFormDataParser(headers={"Content-Type": "multipart/form-data; boundary=B"})
    parser.register("kind", field)
    parser.data_received(b'--B\r\nContent-Disposition: form-data; name="kind"\r\n\r\n')
    with pytest.raises(ValidationError):
        _feed(parser, (b"k" * 8192 for _ in range(1024)))  # 8 MiB, were it all kept
    assert len(field.value) <= max(map(len, KINDS))


def _feed(parser: StreamingFormDataParser, chunks: Iterator[bytes]) -> None:
    for chunk in chunks:
        parser.data_received(chunk)
