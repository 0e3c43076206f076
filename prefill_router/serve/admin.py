"""Hot reload of the router: POST /admin/reload (admin key) or SIGHUP to the serving process.

    POST /admin/reload  {"checkpoint": "<folder>" (default: router.checkpoint), "reload_encoder": false}

The new checkpoint is read, given the running encoder and run once on a prompt in a worker thread while the
old router goes on serving; then the routing engine is swapped in one assignment (`Gateway.swap`): requests
already routing finish on the old router, later ones route on the new one, none fails. A checkpoint trained
on another encoder is refused (409) unless `reload_encoder` is true, which loads its own encoder first (the
encoder `router.encoder` names, else the checkpoint's). A checkpoint that cannot be read is refused (400), as is
one whose targets have no upstream or whose configured policies it cannot apply (409); the old router stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from prefill_router.errors import CheckpointError, ConfigError, EncoderError, PrefillRouterError
from prefill_router.serve.auth import admin_key
from prefill_router.serve.config import GatewayConfig
from prefill_router.serve.engine import RouterScorer
from prefill_router.serve.errors import GatewayError
from prefill_router.serve.jsonbody import read_model
from prefill_router.serve.state import Gateway, GatewayDep

log = logging.getLogger("prefill_router.serve")

router = APIRouter(dependencies=[Depends(admin_key)])


class EncoderMismatch(PrefillRouterError):
    """The checkpoint was trained on features of another encoder than the one the gateway runs."""


MAX_RELOAD_BYTES = 16_384  # a path and a flag


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # "yes" is no boolean

    checkpoint: str | None = Field(default=None, min_length=1, max_length=4096, pattern=r"^[^\x00]+$")
    reload_encoder: bool = False


def _identity_text(identity: object) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


def load_scorer(config: GatewayConfig, checkpoint: Path, running: RouterScorer,
                reload_encoder: bool) -> RouterScorer:
    """A warmed-up scorer for `checkpoint`, sharing the running encoder unless `reload_encoder`. Blocking: run it
    in a worker thread."""
    from prefill_router.router import Router

    new = Router.load(checkpoint)
    if reload_encoder:
        if config.router.encoder:
            from prefill_router.features import load_encoder

            new.attach_encoder(load_encoder(config.router.encoder))
    else:
        if _identity_text(new.encoder_identity) != _identity_text(running.router.encoder_identity):
            raise EncoderMismatch(
                f"{checkpoint}: trained on features of encoder {_identity_text(new.encoder_identity)}, but the "
                f"gateway runs {_identity_text(running.router.encoder_identity)}; send reload_encoder: true to "
                "load that encoder too")
        new.encoder = running.router.encoder  # the same identity: share the loaded model
    scorer = RouterScorer(new, config.router.max_route_tokens, config.router.prefix_cache_mb, config.router.dtype)
    scorer.warm_up()  # also proves the checkpoint reads this encoder's hidden states before it serves
    return scorer


async def reload_router(gw: Gateway, checkpoint: str | Path | None = None, reload_encoder: bool = False,
                        via: str = "POST /admin/reload") -> dict:
    """Swap in the router of `checkpoint` (default: router.checkpoint). Logs the outcome once, naming `via`."""
    if gw.reload_lock is None:
        gw.reload_lock = asyncio.Lock()
    async with gw.reload_lock:  # one reload at a time; requests go on meanwhile
        path = checkpoint if checkpoint is not None else gw.config.router.checkpoint
        if path is None:
            raise _logged(via, GatewayError(400, "checkpoint: none given and router.checkpoint is not set",
                                            code="no_checkpoint"))
        running = gw.engine.scorer
        if not isinstance(running, RouterScorer):
            raise _logged(via, GatewayError(409, "this gateway serves a custom scorer, which cannot be reloaded from "
                                                 "a checkpoint", code="reload_unsupported"))
        try:
            scorer = await anyio.to_thread.run_sync(load_scorer, gw.config, Path(path), running, reload_encoder)
            gw.check_scorer(scorer)
        except EncoderMismatch as exc:
            _refused(gw, exc, via)
            raise GatewayError(409, str(exc), code="encoder_mismatch") from None
        except ConfigError as exc:
            _refused(gw, exc, via)
            raise GatewayError(409, f"{path}: {exc}", code="checkpoint_incompatible") from None
        except (CheckpointError, EncoderError) as exc:
            _refused(gw, exc, via)
            raise GatewayError(400, str(exc), code="checkpoint_invalid") from None
        previous = gw.checkpoint
        gw.swap(scorer, str(path), scorer.encoder_info if reload_encoder else None)
        gw.metrics.reloads.labels(outcome="ok").inc()
        log.warning("%s: router reloaded from %s (was %s)", via, path, previous)
        return {"object": "reload", "reloaded": True, "checkpoint": str(path), "previous": previous,
                "targets": scorer.targets, "policy": scorer.policy_spec(gw.config.router.policy, gw.config.router.lam),
                "loaded_unix": gw.loaded_unix}


def _refused(gw: Gateway, exc: Exception, via: str) -> None:
    gw.metrics.reloads.labels(outcome="refused").inc()
    _logged(via, exc)


def _logged(via: str, exc: Exception) -> Exception:
    log.error("%s: reload refused, the old router goes on serving: %s", via, exc)
    return exc


@router.post("/admin/reload")
async def reload(request: Request, gw: GatewayDep) -> dict:
    body = await read_model(request, ReloadRequest, MAX_RELOAD_BYTES, empty_ok=True)
    return await reload_router(gw, body.checkpoint, body.reload_encoder)


def install_sighup(app: FastAPI) -> bool:
    """SIGHUP reloads router.checkpoint. Only where the event loop runs in the main thread (`prefill-router serve`);
    False elsewhere (a gateway in a background thread reloads through POST /admin/reload)."""
    loop = asyncio.get_running_loop()
    gw: Gateway = app.state.gateway

    async def on_sighup() -> None:
        try:
            await reload_router(gw, via="SIGHUP")  # it logs the outcome
        except GatewayError:
            pass  # refused, and reload_router logged why
        except Exception:  # a signal handler has nobody to raise to
            gw.metrics.reloads.labels(outcome="failed").inc()
            log.exception("SIGHUP: reload failed, the old router goes on serving")

    try:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(on_sighup()))
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        return False
    return True


def remove_sighup() -> None:
    try:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):
        pass
