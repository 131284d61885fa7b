//! A private PostgreSQL cluster from the server binaries on the PATH, for
//! `hookbox dev` and for the test suite when no `DATABASE_URL` is given.

use std::{
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// A running cluster. It is stopped when `stop` is called, and also when the
/// process that started it exits in any way: a guardian process waits on a pipe
/// that closes with us.
pub struct Cluster {
    data_dir: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    _guardian: Option<(Child, ChildStdin)>,
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Throwaway clusters skip fsync: fast, and a crash loses nothing we keep.
    pub durable: bool,
    /// Remove the data directory once the cluster stops.
    pub remove_on_exit: bool,
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug)]
pub enum StopMode {
    Fast,
    Immediate,
}

impl Cluster {
    /// Starts the cluster in `data_dir`, creating it first if needed.
    pub fn start(data_dir: &Path, options: &ClusterOptions) -> anyhow::Result<Self> {
        let bin_dir = find_bin_dir()?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
        let data_dir = data_dir.canonicalize()?;
        hand_to_postgres_user(&data_dir)?;
        if !data_dir.join("PG_VERSION").exists() {
            let mut initdb = as_postgres(&bin_dir.join("initdb"));
            initdb
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                ])
                .arg(&data_dir);
            if !options.durable {
                initdb.arg("--no-sync");
            }
            run_quietly(initdb).context("initdb failed")?;
        }
        let port = match options.port {
            Some(port) => port,
            None => free_port()?,
        };
        let mut cluster = Self {
            data_dir,
            port,
            bin_dir,
            _guardian: None,
        };
        cluster.launch(options.durable)?;
        cluster._guardian = Some(cluster.guardian(options.remove_on_exit)?);
        Ok(cluster)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn stop(&self, mode: StopMode) -> anyhow::Result<()> {
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let mut stop = as_postgres(&self.bin_dir.join("pg_ctl"));
        stop.args(["stop", "-w", "-m", mode, "-D"])
            .arg(&self.data_dir);
        run_quietly(stop).context("pg_ctl stop failed")
    }

    /// Starts a stopped cluster again, on the same port.
    pub fn restart(&self, durable: bool) -> anyhow::Result<()> {
        self.launch(durable)
    }

    fn launch(&self, durable: bool) -> anyhow::Result<()> {
        let mut settings = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=400",
            self.port
        );
        if !durable {
            settings.push_str(" -c fsync=off -c full_page_writes=off");
        }
        let mut start = as_postgres(&self.bin_dir.join("pg_ctl"));
        start
            .args(["start", "-w", "-t", "60", "-o", &settings, "-l"])
            .arg(self.data_dir.join("server.log"))
            .arg("-D")
            .arg(&self.data_dir);
        run_quietly(start).with_context(|| {
            format!(
                "pg_ctl start failed; see {}",
                self.data_dir.join("server.log").display()
            )
        })?;
        wait_for_port(self.port, Duration::from_secs(30))
    }

    fn guardian(&self, remove: bool) -> anyhow::Result<(Child, ChildStdin)> {
        let pg_ctl = self.bin_dir.join("pg_ctl");
        // Ctrl-C and `timeout` signal the whole process group: the guardian
        // ignores them and acts only when its pipe closes.
        let mut script = format!(
            "trap '' INT TERM HUP; cat >/dev/null; {} stop -m immediate -D '{}' >/dev/null 2>&1",
            as_postgres_shell(&pg_ctl),
            self.data_dir.display()
        );
        if remove {
            script.push_str(&format!("; rm -rf '{}'", self.data_dir.display()));
        }
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the cluster's guardian")?;
        let stdin = child.stdin.take().expect("piped stdin");
        Ok((child, stdin))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, mut stdin)) = self._guardian.take() {
            let _ = stdin.flush();
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// PostgreSQL refuses to run as root; as root, run it as `postgres`.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn as_postgres_shell(program: &Path) -> String {
    if is_root() {
        format!("runuser -u postgres -- '{}'", program.display())
    } else {
        format!("'{}'", program.display())
    }
}

fn hand_to_postgres_user(dir: &Path) -> anyhow::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .args(["-R", "postgres:"])
        .arg(dir)
        .status()?;
    if !status.success() {
        bail!(
            "cannot hand {} to the postgres user (is there a postgres user?)",
            dir.display()
        );
    }
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(())
}

/// `initdb` and `pg_ctl` from the PATH, else from Debian's versioned directories.
pub fn find_bin_dir() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versioned.sort_by_key(|p| {
        let version = p
            .parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok());
        std::cmp::Reverse(version)
    });
    on_path
        .into_iter()
        .chain(versioned)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .context("no PostgreSQL server binaries (initdb, pg_ctl) on the PATH or under /usr/lib/postgresql")
}

fn run_quietly(mut command: Command) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .context("cannot run a PostgreSQL program")?;
    if !output.status.success() {
        bail!("{}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_for_port(port: u16, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("PostgreSQL did not start listening on port {port}")
}

/// A PostgreSQL server for tests and benchmarks: the one `$DATABASE_URL`
/// names, or else a private throwaway cluster.
pub enum Server {
    External(String),
    Private(Cluster),
}

impl Server {
    pub fn from_env_or_private(durable: bool) -> anyhow::Result<Self> {
        match std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            Some(url) => Ok(Self::External(url)),
            None => {
                let dir = std::env::temp_dir()
                    .join(format!("hookbox-pg-{}", uuid::Uuid::now_v7().simple()));
                let options = ClusterOptions {
                    durable,
                    remove_on_exit: true,
                    port: None,
                };
                Ok(Self::Private(Cluster::start(&dir, &options)?))
            }
        }
    }

    /// The URL of `database` on this server.
    pub fn url(&self, database: &str) -> anyhow::Result<String> {
        match self {
            Self::External(url) => {
                let mut url = reqwest::Url::parse(url).context("DATABASE_URL is not a URL")?;
                url.set_path(database);
                Ok(url.to_string())
            }
            Self::Private(cluster) => Ok(cluster.url(database)),
        }
    }

    /// A new database named `{prefix}_{unique}`, migrated; returns its URL.
    pub async fn create_database(&self, prefix: &str) -> anyhow::Result<String> {
        let url = self.create_empty_database(prefix).await?;
        crate::db::migrate(&url).await?;
        Ok(url)
    }

    /// A new database named `{prefix}_{unique}`, not migrated; returns its URL.
    pub async fn create_empty_database(&self, prefix: &str) -> anyhow::Result<String> {
        use sqlx::Connection;
        let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")?).await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        self.url(&name)
    }

    /// Drops a database `create_database` made (connections are closed first).
    pub async fn drop_database(&self, url: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        let name = reqwest::Url::parse(url)?
            .path()
            .trim_start_matches('/')
            .to_owned();
        let mut admin = sqlx::PgConnection::connect(&self.url("postgres")?).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        Ok(())
    }
}
