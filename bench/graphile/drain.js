#!/usr/bin/env node
// bench/run.sh phase (w): graphile-worker 0.17.3 draining N stored jobs in its
// batched mode, each job one INSERT into side_effects_graphile.
//   DATABASE_URL=... node bench/graphile/drain.js N
// Runs graphile-worker's migrations, enqueues N jobs with one add_jobs call
// (not timed), then times run() from its start until the job table is empty.
// Env: GRAPHILE_CONCURRENCY (24), GRAPHILE_POOL (concurrency + 1),
// GRAPHILE_LOCAL_QUEUE (500), GRAPHILE_BATCH_DELAY (0): the configuration of
// graphile-worker's own performance page (worker.graphile.org/docs/performance).
"use strict";
// Read when graphile-worker is loaded: no "Completed task ..." line per job
// (as graphile-worker's own perfTest runs it).
process.env.NO_LOG_SUCCESS = "1";
const { Client } = require("pg");
const { run, runMigrations, Logger } = require("graphile-worker");
const sideEffect = require("./tasks/side_effect");

const n = Number(process.argv[2] || 200000);
const connectionString = process.env.DATABASE_URL;
const concurrency = Number(process.env.GRAPHILE_CONCURRENCY || 24);
const poolSize = Number(process.env.GRAPHILE_POOL || concurrency + 1);
const localQueueSize = Number(process.env.GRAPHILE_LOCAL_QUEUE || 500);
const batchDelay = Number(process.env.GRAPHILE_BATCH_DELAY || 0);

// Warnings and errors only (hookbox-worker runs with RUST_LOG=warn).
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") console.error(`graphile-worker ${level}: ${message}`);
});

const preset = {
  worker: {
    connectionString,
    concurrentJobs: concurrency,
    maxPoolSize: poolSize,
    // Batched mode: jobs fetched (and locked) localQueue.size at a time,
    // completions and failures batched into one statement per tick.
    localQueue: { size: localQueueSize },
    completeJobBatchDelay: batchDelay,
    failJobBatchDelay: batchDelay,
    logger,
  },
};

async function main() {
  if (!connectionString) throw new Error("DATABASE_URL is not set");
  await runMigrations({ preset });
  const db = new Client({ connectionString });
  await db.connect();
  // Not timed: N jobs in one add_jobs call, each with a payload like the
  // stored events of phase (c).
  await db.query(
    `SELECT count(*) FROM graphile_worker.add_jobs((
         SELECT array_agg(row('side_effect',
                              json_build_object('uid', 'Uk' || g, 'event', json_build_object('type', 'psychometric_score.complete')),
                              null, null, null, null, null, null)::graphile_worker.job_spec)
         FROM generate_series(1, $1::int) g))`,
    [n],
  );
  await db.query("VACUUM ANALYZE graphile_worker._private_jobs");
  const queued = Number((await db.query("SELECT count(*) AS c FROM graphile_worker._private_jobs")).rows[0].c);
  if (queued !== n) throw new Error(`queued ${queued} jobs, expected ${n}`);
  if (process.env.GRAPHILE_READY_SQL) await db.query(process.env.GRAPHILE_READY_SQL);

  const start = process.hrtime.bigint();
  const runner = await run({ preset, noHandleSignals: true, taskList: { side_effect: sideEffect } });
  for (;;) {
    const { rows } = await db.query("SELECT EXISTS (SELECT 1 FROM graphile_worker._private_jobs) AS left");
    if (!rows[0].left) break;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  await runner.stop();

  const { rows } = await db.query("SELECT count(*) AS rows, count(DISTINCT job_id) AS jobs FROM side_effects_graphile");
  await db.end();
  console.log(`graphile-worker drained ${n} jobs in ${seconds.toFixed(1)}s: ${(n / seconds).toFixed(0)} jobs/s`);
  console.log(`side effects: ${rows[0].rows} rows, ${rows[0].jobs} distinct`);
  console.log(`options: concurrentJobs ${concurrency}, maxPoolSize ${poolSize}, localQueue.size ${localQueueSize}, completeJobBatchDelay ${batchDelay}, failJobBatchDelay ${batchDelay}`);
  if (Number(rows[0].rows) !== n || Number(rows[0].jobs) !== n) {
    console.error(`expected exactly one side effect per job (${n})`);
    process.exit(1);
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
