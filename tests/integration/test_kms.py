"""Data keys wrapped by AWS KMS (moto stands in for the AWS API) across the whole pipeline."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import boto3
import pytest
import requests
from moto import mock_aws

from shared.config import Settings
from shared.keys import KeyProviderError, KmsKeyProvider
from tests import samples
from tests.conftest import serving
from tests.helpers import DRIVER, settled, upload

pytestmark = pytest.mark.services


@pytest.fixture
def kms_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        kms = boto3.client("kms")
        yield kms.create_key(Description="docproc documents")["KeyMetadata"]["Arn"]


def test_documents_are_wrapped_by_kms_end_to_end(
    service_settings: Callable[..., Settings], kms_key: str,
) -> None:
    with serving(service_settings, kms_key_id=kms_key) as run, requests.Session() as http:
        body = samples.pdf(samples.marker(), pages=2)
        doc_id = upload(http, run.base_url, body, "application/pdf").json()["id"]
        doc = settled(http, run.base_url, doc_id)
        assert doc["status"] == "stored"
        assert http.get(doc["download_url"], headers=DRIVER, timeout=30).content == body

        record = run.svc.documents.get(doc_id)
        assert record is not None
        assert record.key.provider == "kms"
        assert record.key.key_id == kms_key
        # the wrapped key is bound to its document: KMS refuses it for any other
        provider = KmsKeyProvider(kms_key)
        assert len(provider.unwrap(record.key, {"document_id": doc_id})) == 32
        with pytest.raises(KeyProviderError):
            provider.unwrap(record.key, {"document_id": "f" * 32})
