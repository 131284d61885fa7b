// The graphile-worker side of bench/run.sh phase (w): per job, exactly one
// INSERT through the helpers' pool client, as hookbox's sql handler runs one
// INSERT per event in phase (c).
module.exports = async function side_effect(_payload, helpers) {
  await helpers.query(
    "INSERT INTO side_effects_graphile (job_id, at) VALUES ($1, clock_timestamp())",
    [helpers.job.id],
  );
};
