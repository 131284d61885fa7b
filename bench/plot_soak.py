"""Plots a soak run's samples: python3 bench/plot_soak.py samples.csv soak.png (needs matplotlib)."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows = list(csv.DictReader(open(sys.argv[1])))
t = [float(r["seconds"]) / 60 for r in rows]
col = lambda name: [float(r[name]) for r in rows]  # noqa: E731
fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
axes[0].plot(t, col("receiver_rss_mib"), label="receiver")
axes[0].plot(t, col("worker_rss_mib"), label="worker")
axes[0].set_ylabel("RSS (MiB)")
axes[1].plot(t, col("db_connections"), label="connections to the inbox database")
axes[1].set_ylabel("connections")
axes[2].plot(t, col("events_mib"), label="inbox_events (state and payloads)")
axes[2].plot(t, col("deliveries_mib"), label="inbox_deliveries")
axes[2].plot(t, col("attempts_mib"), label="inbox_attempts")
if "payloads_mib" in rows[0]:
    axes[2].plot(t, col("payloads_mib"), label="inbox_payloads (part of inbox_events)")
axes[2].set_ylabel("table size (MiB)")
axes[3].plot(t, col("pending"), label="pending")
axes[3].plot(t, col("retrying"), label="retrying")
axes[3].plot(t, col("dead"), label="dead")
axes[3].set_ylabel("events")
axes[3].set_xlabel("minutes")
for r, x in zip(rows, t):
    # Restarts are marked; the minute's prune of a retention run is not.
    if r["event"] and not r["event"].startswith("pruned"):
        for ax in axes:
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        axes[0].annotate(r["event"], (x, 0.03), xycoords=("data", "axes fraction"), rotation=90, fontsize=7, va="bottom", ha="right")
for ax in axes:
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
fig.suptitle("hookbox soak: 150 deliveries/s, 20% duplicates, 5% handler failures")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=90)
