"""The run's retrieval service: connect to running ones (`RetrievalSpec.addresses`) or start one on a free
loopback port over an index (`RetrievalSpec.index_dir`, or the demo corpus's own index), for as long as the
run's ExitStack lives. Start-up waits for a healthy answer and fails naming the addresses."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time

import jax

from tspo_jax.training import bootstrap, multihost
from tspo_jax.training.errors import StartupError

log = logging.getLogger("tspo_jax.train")


def connect_retrieval(spec, stack: contextlib.ExitStack, *, local_dir: pathlib.Path,
                      demo_corpus: pathlib.Path | None = None):
    """A healthy `RetrievalClient` for RetrievalSpec `spec`; services and clients it opens close with `stack`.

    demo_corpus: when neither addresses nor index_dir is set, index this corpus (once, in local_dir) and serve it.
    """
    from retrieval_service.client import RetrievalClient
    from retrieval_service.process import RetrievalServer

    addresses = list(spec.addresses)
    if not addresses:
        index_dir = spec.index_dir
        if index_dir is None:
            if demo_corpus is None:
                raise StartupError("no retrieval service: set RetrievalSpec.addresses (running services) or "
                                   "RetrievalSpec.index_dir (an index to serve)")
            with multihost.process_zero_first("demo index"):
                index_dir = bootstrap.retrieval_index(demo_corpus, pathlib.Path(demo_corpus).parent / "index",
                                                      backend=spec.demo_backend)
        if not pathlib.Path(index_dir, "manifest.json").exists():
            raise StartupError(f"RetrievalSpec.index_dir {index_dir} has no manifest.json (not an index built "
                               "by retrieval_service.build_index)")
        name = ("retrieval_service.log" if jax.process_count() == 1
                else f"retrieval_service.{jax.process_index()}.log")
        server = RetrievalServer(index_dir, port=0, log_path=local_dir / name)
        try:
            server.start()
        except RuntimeError as error:
            raise StartupError(f"the retrieval service over {index_dir} did not start: {error}") from None
        stack.callback(server.stop)
        log.info("retrieval service on %s (log %s)", server.address, server.log_path)
        addresses = [server.address]
    client = RetrievalClient(addresses, deadline_s=spec.deadline_s, max_attempts=spec.max_attempts,
                             backoff_s=spec.backoff_s)
    stack.callback(client.close)
    deadline = time.monotonic() + spec.wait_for_service_s
    while not client.health():
        if time.monotonic() >= deadline:
            raise StartupError(
                f"retrieval service unreachable at start-up: no healthy answer from {', '.join(addresses)} "
                f"(RetrievalSpec.addresses; waited {spec.wait_for_service_s:.0f}s, deadline "
                f"{spec.deadline_s}s per call)")
        time.sleep(1.0)
    return client
