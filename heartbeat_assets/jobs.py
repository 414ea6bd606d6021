"""The `medallion` job: every asset of the lakehouse, bronze to gold."""

from dagster import AssetSelection, define_asset_job

medallion_job = define_asset_job(
    "medallion",
    selection=AssetSelection.all(),
    description="Ingest landed files and bring every bronze, silver and gold table up to date.",
)
