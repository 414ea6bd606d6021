"""Schedules: an hourly `medallion` run, a safety net in case a sensor tick is missed or sensors are
off; and the daily table maintenance."""

from dagster import DefaultScheduleStatus, ScheduleDefinition

from heartbeat_assets.jobs import medallion_job
from heartbeat_assets.maintenance import lakehouse_maintenance

hourly_medallion_schedule = ScheduleDefinition(
    name="hourly_medallion",
    job=medallion_job,
    cron_schedule="0 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
)

daily_maintenance_schedule = ScheduleDefinition(
    name="daily_maintenance",
    job=lakehouse_maintenance,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
)
