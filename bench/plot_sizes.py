"""Table sizes of soak runs side by side:
python3 bench/plot_sizes.py out.png LABEL=samples.csv [LABEL=samples.csv ...] (needs matplotlib).

One panel per run: the event rows (inbox_event_state with its indexes), the
payloads, the deliveries and the attempts, in MiB, against minutes."""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out, runs = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), sharey=True, squeeze=False)
for ax, (label, path) in zip(axes[0], runs):
    rows = list(csv.DictReader(open(path)))
    t = [float(r["seconds"]) / 60 for r in rows]
    col = lambda name: [float(r[name]) for r in rows]  # noqa: E731
    state = [e - p for e, p in zip(col("events_mib"), col("payloads_mib"))]
    ax.plot(t, state, label="event rows (inbox_event_state)")
    ax.plot(t, col("payloads_mib"), label="inbox_payloads")
    ax.plot(t, col("deliveries_mib"), label="inbox_deliveries")
    ax.plot(t, col("attempts_mib"), label="inbox_attempts")
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("minutes")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
axes[0][0].set_ylabel("size with indexes (MiB)")
fig.tight_layout()
fig.savefig(out, dpi=110)
