"""Jobs: `medallion` (every asset, bronze to gold) and a full refresh from each layer."""

from dagster import AssetSelection, define_asset_job

from heartbeat_assets.streaming import FULL_REFRESH_TAG, LAYERS

medallion_job = define_asset_job(
    "medallion",
    selection=AssetSelection.all(),
    description="Ingest landed files and bring every bronze, silver and gold table up to date.",
)


def _full_refresh_job(layer: str):
    return define_asset_job(
        f"full_refresh_{layer}",
        selection=AssetSelection.groups(layer).downstream(),
        tags={FULL_REFRESH_TAG: layer},
        description=(
            f"Rebuild the {layer} tables and everything downstream from scratch: their checkpoints and "
            "tables are reset, then recomputed from upstream (bronze from the landing folders)."
        ),
    )


full_refresh_jobs = [_full_refresh_job(layer) for layer in LAYERS]
