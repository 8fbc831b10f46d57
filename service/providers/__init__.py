"""Provider adapters: one module per upstream provider, all behind :mod:`.base`.

:data:`ADAPTER_CLASSES` names every adapter by its provider key; :func:`build_adapters` makes
one per configured provider, all sharing the app's ``httpx.AsyncClient``.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from service.errors import SettingsError
from service.providers.apiinone import APIInOneAdapter
from service.providers.base import ProviderAdapter
from service.providers.evolink import EvoLinkAdapter
from service.providers.gptimage15 import GPTImage15Adapter
from service.providers.grsai import GrsAIAdapter
from service.providers.openai import OpenAIAdapter
from service.settings import Settings

ADAPTER_CLASSES: dict[str, type[ProviderAdapter]] = {
    adapter.name: adapter
    for adapter in (
        OpenAIAdapter,
        GrsAIAdapter,
        GPTImage15Adapter,
        EvoLinkAdapter,
        APIInOneAdapter,
    )
}

__all__ = ["ADAPTER_CLASSES", "ProviderAdapter", "build_adapters"]


def build_adapters(
    settings: Settings,
    http: httpx.AsyncClient,
    *,
    clients: Mapping[str, httpx.AsyncClient] | None = None,
) -> dict[str, ProviderAdapter]:
    """One adapter per provider in ``settings.providers``, each with its own settings, on
    its client in ``clients`` (``http`` for any provider it does not name)."""
    unknown = sorted(set(settings.providers) - set(ADAPTER_CLASSES))
    if unknown:
        raise SettingsError(
            f"No adapter for provider(s) {', '.join(unknown)}; known providers: "
            f"{', '.join(ADAPTER_CLASSES)}."
        )
    return {
        name: ADAPTER_CLASSES[name](provider_settings, (clients or {}).get(name, http))
        for name, provider_settings in settings.providers.items()
    }
