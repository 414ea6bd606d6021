"""Assembles the lakehouse: assets of every layer, the jobs, sensors, schedules and resources."""

from dagster import Definitions, in_process_executor, load_assets_from_modules

from heartbeat_assets import bronze, gold, silver
from heartbeat_assets.jobs import full_refresh_jobs, medallion_job
from heartbeat_assets.maintenance import lakehouse_maintenance
from heartbeat_assets.schedules import daily_maintenance_schedule, hourly_medallion_schedule
from heartbeat_assets.sensors import patients_landing_sensor, recordings_landing_sensor
from resources import LakehouseResource, SparkSessionResource, resources_from_env


def build_definitions(lakehouse: LakehouseResource | None = None, spark: SparkSessionResource | None = None):
    """The project's `Definitions`, with resources from the environment unless given (tests give theirs)."""
    from_env = resources_from_env()
    lakehouse = lakehouse or from_env["lakehouse"]
    return Definitions(
        assets=load_assets_from_modules([bronze, silver, gold]),
        jobs=[medallion_job, *full_refresh_jobs, lakehouse_maintenance],
        sensors=[recordings_landing_sensor, patients_landing_sensor],
        schedules=[hourly_medallion_schedule, daily_maintenance_schedule],
        resources={"lakehouse": lakehouse, "spark": spark or from_env["spark"]},
        # One process and one SparkSession per run: the multiprocess executor would start a JVM per asset.
        executor=in_process_executor,
    )


defs = build_definitions()
