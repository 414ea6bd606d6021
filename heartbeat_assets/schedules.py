"""An hourly `medallion` run: a safety net in case a sensor tick is missed or sensors are off."""

from dagster import DefaultScheduleStatus, ScheduleDefinition

from heartbeat_assets.jobs import medallion_job

hourly_medallion_schedule = ScheduleDefinition(
    name="hourly_medallion",
    job=medallion_job,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
)
