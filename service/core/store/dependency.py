"""The artifact store a request uses: the one the app was given (`create_app(store=...)`), else
the configured one."""

from typing import Annotated

from fastapi import Depends, Request

from service.core.store import ArtifactStore, get_store


async def artifact_store(request: Request) -> ArtifactStore:
    store: ArtifactStore | None = request.app.state.store
    return store if store is not None else get_store()


StoreDep = Annotated[ArtifactStore, Depends(artifact_store)]
