"""Gold aggregates and tables on tiny DataFrames, with the exact rows expected."""

from datetime import date, datetime

from heartbeat_assets.gold import (
    daily_patient_avg,
    device_signal_loss,
    device_window_counts,
    heartrate_by_patient,
    patient_daily_totals,
    patient_totals,
)

SILVER = "device_id int, mrn bigint, recorded_at timestamp, heartrate double, date date"


def silver(spark, *rows):
    return spark.createDataFrame([(d, m, t, hr, t.date()) for d, m, t, hr in rows], SILVER)


def patients(spark):
    return spark.createDataFrame([(10, "Ann"), (20, "Bob")], "mrn bigint, name string")


def by_patient(spark, rows):
    """heartrate_by_patient as gold builds it: rolled up from the per-day aggregate."""
    return heartrate_by_patient(patient_totals(patient_daily_totals(rows)), patients(spark))


def test_heartrate_by_patient_is_exact_ceiling_of_the_mean(spark):
    day = datetime(2024, 1, 1)
    rows = silver(
        spark,
        (1, 10, day, 72.1), (1, 10, day, 72.2), (1, 10, day, 72.7),  # mean 72.333 -> 73
        (2, 20, day, 0.1), (2, 20, day, 0.2), (2, 20, day, 0.3),  # mean exactly 0.2 -> 1
        (3, 20, day, 59.8), (3, 20, day, 60.2),
        (4, 99, day, 80.0),  # unknown patient: not in gold
    )  # fmt: skip
    got = sorted(tuple(r) for r in by_patient(spark, rows).collect())
    assert got == [(10, "Ann", 73, 3), (20, "Bob", 25, 5)]


def test_mean_that_is_an_integer_is_not_rounded_up(spark):
    day = datetime(2024, 1, 1)
    # In binary floating point 0.1 + 0.2 + 0.3 + 59.4 is not 60; the exact mean is 15.
    rows = silver(spark, (1, 10, day, 0.1), (1, 10, day, 0.2), (1, 10, day, 0.3), (1, 10, day, 59.4))
    (row,) = by_patient(spark, rows).collect()
    assert row.avg_heartrate == 15


def test_mean_over_days_keeps_every_digit(spark):
    day1, day2 = datetime(2024, 1, 1), datetime(2024, 1, 2)
    # Mean 60.0000004: rounded to the sums' 6 digits it would be 60.000000, and its ceiling 60.
    rows = silver(
        spark,
        (1, 10, day1, 60.000001), (1, 10, day1, 60.000001),
        (1, 10, day2, 60.0), (1, 10, day2, 60.0), (1, 10, day2, 60.0),
    )  # fmt: skip
    (row,) = by_patient(spark, rows).collect()
    assert (row.avg_heartrate, row["count"]) == (61, 5)


def test_daily_patient_avg_per_utc_date(spark):
    rows = silver(
        spark,
        (1, 10, datetime(2024, 1, 1, 23, 59), 60.0),
        (1, 10, datetime(2024, 1, 2, 0, 1), 70.0),
        (1, 10, datetime(2024, 1, 2, 12, 0), 81.0),
    )
    got = sorted(tuple(r) for r in daily_patient_avg(patient_daily_totals(rows), patients(spark)).collect())
    assert got == [(10, "Ann", date(2024, 1, 1), 60.0, 1), (10, "Ann", date(2024, 1, 2), 75.5, 2)]


def test_signal_loss_finds_sparse_and_silent_windows(spark):
    def at(minute, second=0):
        return datetime(2024, 1, 1, 0, minute, second)

    rows = silver(
        spark,
        *[(1, 10, at(0, s), 70.0) for s in range(40)],  # minute 0: 40 readings, fine
        *[(1, 10, at(1, s), 70.0) for s in range(10)],  # minute 1: 10 readings, sparse
        # minutes 2-3: silent
        *[(1, 10, at(4, s), 70.0) for s in range(35)],  # minute 4: fine
        *[(2, 10, at(0, s), 70.0) for s in range(31)],  # device 2 stops after minute 0...
        *[(3, 10, at(9, s), 70.0) for s in range(30)],  # ...while device 3 runs until minute 9
    )
    alerts = device_signal_loss(
        device_window_counts(rows, 60), window_seconds=60, min_readings=30, max_silent_windows=3
    )
    got = sorted((r.device_id, r.window_start, r.window_end, r.readings) for r in alerts.collect())
    assert got == [
        (1, at(1), at(2), 10),
        (1, at(2), at(3), 0),
        (1, at(3), at(4), 0),
        (1, at(5), at(6), 0),  # after its last reading, up to the newest window (9) ...
        (1, at(6), at(7), 0),
        (1, at(7), at(8), 0),  # ... but no more than 3 silent windows
        (2, at(1), at(2), 0),
        (2, at(2), at(3), 0),
        (2, at(3), at(4), 0),
    ]
