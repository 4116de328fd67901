"""The dispatcher's own decisions that need no TorchServe to show."""

from __future__ import annotations

import asyncio
import json

import pytest

from sdxl_jobs.dispatcher import Dispatcher, Unavailable
from sdxl_jobs.processes import free_port
from sdxl_jobs.settings import JobSettings
from sdxl_jobs.store import JobStore
from sdxl_serve.management import KeyFile

pytestmark = pytest.mark.jobs


def test_a_key_renewal_that_cannot_reach_torchserve_is_unavailable_not_the_jobs_fault(
        tmp_path):
    """TorchServe refused the expired inference key and its management API is gone too (the
    whole server restarting): the job waits as for any unavailable TorchServe, and uses no
    attempt, instead of failing its call and being taken over after its lease."""
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": "old"}, "API": {"key": "a"}}))
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def renew_the_refused_key():
        dispatcher = Dispatcher(JobStore.from_url("redis://127.0.0.1:9/0"), JobSettings(),
                                nobody, KeyFile(path, nobody))
        try:
            with pytest.raises(Unavailable, match="renewing the inference key failed"):
                await dispatcher._key(refused="old")
        finally:
            await dispatcher.client.aclose()
    asyncio.run(renew_the_refused_key())
