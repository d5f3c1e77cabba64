//! The command line: `serve`, `check-config`, and the operator commands that act on the store
//! directly (users, sessions, sign-outs). A running gateway picks up their revocations through
//! its sync loop: at once when the store announces them (the SQLite file's watch, PostgreSQL's
//! NOTIFY), at the latest within the poll interval.
//!
//! Exit codes: 0 success, 1 a refused action (one line on stderr says why), 2 bad usage or a bad
//! config.

use crate::app::account::LinkPurpose;
use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::app::now_ms;
use crate::auth::password::{check_policy, generate_password, Hasher};
use crate::config::{Config, Secret};
use crate::store::{
    self, AuditEntry, DynStore, Record, SessionId, SessionRecord, StoreError, User,
};

#[derive(Parser, Debug)]
#[command(
    name = "portcullis",
    version,
    about = "An authentication gateway for media servers"
)]
pub struct Cli {
    /// Config file.
    #[arg(
        long,
        global = true,
        env = "PORTCULLIS_CONFIG",
        default_value = "config/portcullis.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Take the listening sockets over from the running gateway (then send it SIGQUIT)
        /// instead of binding them: a binary upgrade without refused connections.
        #[arg(long)]
        upgrade: bool,
    },
    /// Replace the running gateway (the pid file in data_dir) by a new process of the binary
    /// now installed, without dropping connections; waits until the new process serves.
    Upgrade {
        /// How long to wait for the new process, e.g. 2m.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Make the running gateway re-read its config file (SIGHUP), and report the outcome.
    Reload,
    /// Validate config files (the --config file when none are named).
    CheckConfig { files: Vec<PathBuf> },
    /// Exit 0 when the admin listener's /healthz answers 200, else 1 with the reason (for
    /// container health checks).
    Healthcheck {
        /// host:port to probe instead of the config's server.admin_listen.
        #[arg(long)]
        addr: Option<String>,
        /// Give up after this long, e.g. 3s.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
        timeout: std::time::Duration,
    },
    /// Manage user accounts.
    #[command(subcommand)]
    User(UserCommand),
    /// List or end sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Sign out every device of one user, or of everyone.
    Signout(SignoutArgs),
    /// Breach response: sign out everyone, require a new password of every user at next login,
    /// and replace the session signing key (the old one stops working everywhere).
    BreachResponse {
        /// Also require every user to register a passkey at their next sign-in and to sign in
        /// with it from then on (a phished password or code then opens nothing).
        #[arg(long)]
        require_passkey: bool,
        /// Mail every user with a verified address what happened and what to do (sent by the
        /// running gateway's outbox).
        #[arg(long)]
        notify: bool,
    },
    /// Mail: send a test message, or look at the outbox.
    #[command(subcommand)]
    Mail(MailCommand),
    /// Manage session signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Plex: accounts linked to gateway users, devices, the server self-check.
    #[command(subcommand)]
    Plex(PlexCommand),
    /// The groups users belong to, for access rules (`admins` is the administrator flag).
    #[command(subcommand)]
    Group(GroupCommand),
    /// The LDAP directory (`[directory]`): check the connection, the service account and
    /// what the gateway reads of a user.
    #[command(subcommand)]
    Directory(DirectoryCommand),
    /// Copy the store (online, while the gateway serves) and its key files into one file.
    Backup {
        /// The backup file to write (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into the configured store and key files (the gateway must be stopped).
    /// Every session and media token from before the backup is ended unless --keep-sessions.
    Restore {
        file: PathBuf,
        /// Keep the sessions in the backup alive (those signed out after it come back too).
        #[arg(long)]
        keep_sessions: bool,
        /// Move an existing store and key files aside instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Show the audit log, newest first.
    Audit {
        #[arg(long)]
        user: Option<String>,
        /// Only events newer than this, e.g. 1h, 7days.
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
        #[arg(long)]
        json: bool,
        /// At most this many events.
        #[arg(long, default_value_t = 200)]
        limit: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Start signing with a new key; the old keys keep verifying until their tokens expire.
    Rotate,
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Create a user; without --password-stdin a strong password is generated and printed once.
    Add {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set a user's password (generated and printed once without --password-stdin).
    Passwd {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Disable a user: every session ends and logins are refused.
    Disable { name: String },
    /// Enable a disabled user (old sessions stay ended).
    Enable { name: String },
    /// List users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a one-time password reset link (stored only as a hash).
    ResetLink { name: String },
    /// Print a one-time link that registers a passkey for a user who lost theirs (stored only
    /// as a hash; using it signs out every device of the user).
    PasskeyLink { name: String },
    /// Make the next login of a user (or of every user) choose a new password first.
    RequireReset {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Make a user (or every user) sign in with a passkey only: one is registered at their
    /// next sign-in, after which the password alone opens nothing. `--off` lifts it.
    RequirePasskey {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        off: bool,
    },
    /// Clear a user's failed logins and lock.
    Unlock { name: String },
    /// Set a user's email address (verified: the administrator vouches for it), or clear it.
    SetEmail {
        name: String,
        address: Option<String>,
        #[arg(long, conflicts_with = "address")]
        clear: bool,
    },
    /// Link a single sign-on provider's subject (`sub`) to a user.
    LinkOidc {
        name: String,
        /// The provider's `id` in `[[oidc]]`.
        #[arg(long)]
        provider: String,
        /// The subject (`sub` claim) the provider gives the user.
        #[arg(long)]
        subject: String,
    },
    /// Remove a user's link to a single sign-on provider.
    UnlinkOidc {
        name: String,
        #[arg(long)]
        provider: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum SessionCommand {
    /// List live sessions.
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// End one session.
    Revoke { session_id: String },
}

#[derive(Subcommand, Debug)]
pub enum MailCommand {
    /// Send a test message to ADDRESS through the configured SMTP server, now (not through the
    /// outbox), and say how it went.
    Test { address: String },
    /// The newest messages of the outbox: kind, recipient, state, attempts.
    Outbox {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DirectoryCommand {
    /// Bind as the service account, count the users allowed to sign in, and show how the
    /// gateway sees one of them (DN, email, groups) with --user.
    Check {
        #[arg(long)]
        user: Option<String>,
    },
    /// Hand the record of NAME (its passkeys, TOTP, links) to the directory entry that has the
    /// name now (after a user was recreated in the directory): every session of theirs ends.
    Relink { name: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Put a user in a group (`admins` makes them an administrator).
    Add { user: String, group: String },
    /// Take a user out of a group.
    Remove { user: String, group: String },
    /// The groups and how many users are in each, or one user's groups with --user.
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlexCommand {
    /// List the Plex accounts the gateway has met and who they are linked to.
    Accounts {
        #[arg(long)]
        json: bool,
    },
    /// Link a Plex account (its id or user name) to a gateway user: its tokens then pass.
    Link { user: String, plex_account: String },
    /// Unlink a Plex account: every token of it bound at the gateway ends at once.
    Unlink { plex_account: String },
    /// List Plex devices (app installs), of one gateway user or all.
    Devices {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Approve a device (device approval): PLEX_ACCOUNT and the app's client identifier.
    Approve {
        plex_account: String,
        client_id: String,
    },
    /// Revoke a device: its approval is withdrawn and its tokens end at once.
    Revoke {
        plex_account: String,
        client_id: String,
    },
    /// Read every plex route's server settings and report what would let anyone around the
    /// gateway (exit 1 when a problem is fatal or the server cannot be read).
    Check,
    /// Also sign out at plex.tv (best effort, never the enforcement): remove the owner's own
    /// devices the gateway has seen, or stop sharing the server with a friend or Home user.
    RevokeUpstream { plex_account: String },
}

#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
pub struct SignoutArgs {
    /// Sign out every device of this user.
    #[arg(long)]
    user: Option<String>,
    /// Sign out every device of every user.
    #[arg(long)]
    everyone: bool,
}

/// A refused action: exit code 1 with this one-line reason.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

fn refused(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Refused(msg.into()))
}

/// Parses the command line, runs the command and returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    if let Command::CheckConfig { files } = &cli.command {
        return check_config(&cli.config, files);
    }
    if let Command::Healthcheck { addr, timeout } = &cli.command {
        return healthcheck(&cli.config, addr.as_deref(), *timeout);
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("portcullis: {e}");
            return 2;
        }
    };
    // Held until the command returns, so the log lines still queued are written.
    let _log = crate::telemetry::init(&config.log);
    let result = match cli.command {
        Command::Reload => reload(&config),
        Command::Serve { upgrade } => {
            crate::server::serve(config, crate::server::ServeOptions { upgrade })
                .map_err(anyhow::Error::from)
        }
        Command::Upgrade { timeout } => upgrade(&config, timeout),
        Command::Backup { .. } | Command::Restore { .. } => backup_command(config, cli.command),
        other => run_store_command(config, other),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            if e.downcast_ref::<Refused>().is_some() {
                eprintln!("portcullis: {e}");
            } else {
                eprintln!("portcullis: {e:#}");
            }
            1
        }
    }
}

/// `portcullis upgrade`: see `server::upgrade::request`.
fn upgrade(config: &Config, timeout: std::time::Duration) -> anyhow::Result<()> {
    let (old, new) = crate::server::upgrade::request(&config.server.data_dir, timeout)
        .map_err(|e| refused(e.to_string()))?;
    println!(
        "portcullis: pid {new} serves now; pid {old} finishes its requests in flight and exits"
    );
    Ok(())
}

fn check_config(default: &std::path::Path, files: &[PathBuf]) -> i32 {
    let files: Vec<PathBuf> = if files.is_empty() {
        vec![default.to_path_buf()]
    } else {
        files.to_vec()
    };
    let mut code = 0;
    for f in &files {
        match Config::load(f) {
            Ok(c) => match store_checks(&c) {
                None => {
                    for (later, earlier) in crate::config::rules::shadowed(&c.rules) {
                        eprintln!(
                            "portcullis: {}: warning: rule `{later}` never applies: rule \
                             `{earlier}` before it matches every request it would",
                            f.display()
                        );
                    }
                    println!(
                        "{}: ok ({} route{}, store {})",
                        f.display(),
                        c.routes.len(),
                        if c.routes.len() == 1 { "" } else { "s" },
                        c.store.url.expose().split("://").next().unwrap_or("?")
                    )
                }
                Some((key, problem)) => {
                    eprintln!("portcullis: {}: key `{key}`: {problem}", f.display());
                    code = 2;
                }
            },
            Err(e) => {
                eprintln!("portcullis: {e}");
                code = 2;
            }
        }
    }
    code
}

/// What the store `config` names says against it, as (key, problem): a relying-party id that
/// would strand registered passkeys, a rule about a group nobody is in. The store is only
/// looked at (nothing created, nothing migrated); one that does not exist yet has neither, and
/// one that cannot be reached is reported and not held against the file.
fn store_checks(config: &Config) -> Option<(String, String)> {
    const LOOK: std::time::Duration = std::time::Duration::from_secs(5);
    // Migrations 0008 and 0010 made the passkeys and groups tables.
    const PASSKEY_SCHEMA: i64 = 8;
    const GROUP_SCHEMA: i64 = 10;
    let look = async {
        let Some((store, version)) =
            crate::store::open_as_is(config.store.url.expose(), LOOK).await?
        else {
            return Ok(None);
        };
        if version >= PASSKEY_SCHEMA {
            if let Some(problem) =
                crate::app::passkey::rp_id_conflict(&store, &config.webauthn.rp_id).await?
            {
                return Ok(Some(("webauthn.rp_id".to_string(), problem)));
            }
        }
        let known: Vec<String> = if version >= GROUP_SCHEMA {
            store
                .list_groups()
                .await?
                .into_iter()
                .map(|(g, _)| g)
                .collect()
        } else {
            vec!["admins".to_string()]
        };
        for (i, rule) in config.rules.iter().enumerate() {
            for s in &rule.subjects {
                if let crate::config::Subject::Group(g) = s {
                    // A directory's groups arrive with its users' sign-ins and syncs.
                    if !known.contains(g) && config.directory.is_none() {
                        return Ok(Some((
                            format!("rule[{i}].subjects"),
                            format!(
                                "nobody is in group `{g}` (put users in it first: `portcullis \
                                 group add USER {g}`)"
                            ),
                        )));
                    }
                }
            }
        }
        Ok::<_, crate::store::StoreError>(None)
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("portcullis: passkeys not checked: {e}");
            return None;
        }
    };
    match runtime.block_on(async { tokio::time::timeout(2 * LOOK, look).await }) {
        Ok(Ok(problem)) => problem,
        Ok(Err(e)) => {
            eprintln!(
                "portcullis: the store could not be read ({e}): `webauthn.rp_id` and the rules' groups not checked against it"
            );
            None
        }
        Err(_) => {
            eprintln!(
                "portcullis: the store did not answer: `webauthn.rp_id` and the rules' groups not checked against it"
            );
            None
        }
    }
}

/// `portcullis reload`: the file was validated before this runs (as `check-config` does), so
/// only a file that the gateway will accept is signalled.
fn reload(config: &Config) -> anyhow::Result<()> {
    use crate::server::reload;
    let status = reload::request(&config.server.data_dir, std::time::Duration::from_secs(15))
        .map_err(|e| refused(e.to_string()))?;
    match status.result.as_str() {
        "refused" => Err(refused(format!(
            "the gateway refused the config: {}",
            status.error
        ))),
        _ => {
            println!("reloaded (pid {})", status.pid);
            if !status.routes_added.is_empty() {
                println!("  routes added: {}", status.routes_added.join(", "));
            }
            if !status.routes_removed.is_empty() {
                println!("  routes removed: {}", status.routes_removed.join(", "));
            }
            for key in &status.needs_restart {
                println!("  `{key}` changed but needs a restart: the running value stays");
            }
            Ok(())
        }
    }
}

/// `portcullis healthcheck` (the container's HEALTHCHECK): GET /healthz on the admin listener.
/// Exit code 1 for every failure: a health check reads 2 as "reserved".
fn healthcheck(config: &std::path::Path, addr: Option<&str>, timeout: std::time::Duration) -> i32 {
    use crate::healthcheck as hc;
    let target = match addr {
        Some(a) => Ok(a.to_string()),
        None => hc::admin_listen_of(config),
    }
    .and_then(|a| hc::resolve(&a))
    .and_then(|a| hc::check(a, timeout).map(|()| a));
    match target {
        Ok(a) => {
            println!("ok: http://{a}/healthz answered 200");
            0
        }
        Err(e) => {
            eprintln!("portcullis: unhealthy: {e}");
            1
        }
    }
}

/// The configured webhooks, for the CLI's audited actions (set once per command).
static WEBHOOKS: std::sync::OnceLock<Vec<crate::config::webhook::WebhookConfig>> =
    std::sync::OnceLock::new();

fn run_store_command(config: Config, command: Command) -> anyhow::Result<()> {
    let _ = WEBHOOKS.set(config.webhooks.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let store = store::open(config.store.url.expose(), config.store.busy_timeout)
            .await
            .map_err(|e| refused(e.to_string()))?;
        match command {
            Command::User(c) => user_command(&config, &store, c).await,
            Command::Session(c) => session_command(&store, c).await,
            Command::Signout(a) => signout(&store, a).await,
            Command::BreachResponse {
                require_passkey,
                notify,
            } => breach(&config, &store, require_passkey, notify).await,
            Command::Mail(c) => mail_command(&config, &store, c).await,
            Command::Keys(KeysCommand::Rotate) => rotate_keys(&config, &store).await,
            Command::Plex(c) => plex_command(&config, &store, c).await,
            Command::Group(c) => group_command(&store, c).await,
            Command::Directory(DirectoryCommand::Check { user }) => {
                directory_check(&config, user.as_deref()).await
            }
            Command::Directory(DirectoryCommand::Relink { name }) => {
                directory_relink(&config, &store, &name).await
            }
            Command::Audit {
                user,
                since,
                json,
                limit,
            } => audit(&store, user, since, json, limit).await,
            Command::Serve { .. }
            | Command::Upgrade { .. }
            | Command::CheckConfig { .. }
            | Command::Reload
            | Command::Healthcheck { .. }
            | Command::Backup { .. }
            | Command::Restore { .. } => Ok(()),
        }
    })
}

async fn group_command(store: &DynStore, command: GroupCommand) -> anyhow::Result<()> {
    let change = |user: String, group: String, member: bool| async move {
        let group =
            crate::config::group_name(&group).map_err(|e| refused(format!("`{group}`: {e}")))?;
        let user = find_user(store, &user).await?;
        let changed = store
            .set_group(user.id, &group, member, now_ms())
            .await
            .map_err(store_refusal)?;
        let (event, done) = if member {
            ("group_add", "is in")
        } else {
            ("group_remove", "is not in")
        };
        if changed.is_some() {
            cli_audit(store, event, Some(&user), &format!("group {group}")).await;
        }
        println!(
            "{} {done} `{group}`{}",
            user.name,
            if changed.is_some() { "" } else { " (already)" }
        );
        Ok(())
    };
    match command {
        GroupCommand::Add { user, group } => change(user, group, true).await,
        GroupCommand::Remove { user, group } => change(user, group, false).await,
        GroupCommand::List {
            user: Some(name),
            json,
        } => {
            let user = find_user(store, &name).await?;
            let groups = store.groups_of(user.id).await.map_err(store_refusal)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
            } else {
                for g in groups {
                    println!("{g}");
                }
            }
            Ok(())
        }
        GroupCommand::List { user: None, json } => {
            let groups = store.list_groups().await.map_err(store_refusal)?;
            if json {
                let list: Vec<_> = groups
                    .iter()
                    .map(|(g, n)| serde_json::json!({ "group": g, "members": n }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<32} MEMBERS", "GROUP");
                for (g, n) in groups {
                    println!("{g:<32} {n}");
                }
            }
            Ok(())
        }
    }
}

/// The directory client of the CLI (its operations are not counted).
fn cli_directory(config: &Config) -> anyhow::Result<Option<crate::directory::Directory>> {
    let Some(d) = &config.directory else {
        return Ok(None);
    };
    crate::directory::Directory::new(d, Box::new(|_, _| {}))
        .map(Some)
        .map_err(|(key, problem)| refused(format!("key `{key}`: {problem}")))
}

/// A name lives in one place only: a local account is refused a name the directory holds (and
/// when the directory cannot be asked, refused too, with the reason).
async fn refuse_directory_name(config: &Config, name: &str) -> anyhow::Result<()> {
    let Some(directory) = cli_directory(config)? else {
        return Ok(());
    };
    match directory.find(name).await {
        Ok(None) => Ok(()),
        Ok(Some(u)) => Err(refused(format!(
            "`{name}` is a user of the directory ({}): a local account of the same name is \
             refused (a name lives in one place only)",
            u.dn
        ))),
        Err(e) => Err(refused(format!(
            "cannot check that the directory has no `{name}`: {e}"
        ))),
    }
}

/// A directory user's password is the directory's: the gateway neither sets nor resets it.
fn refuse_directory_user(user: &User) -> anyhow::Result<()> {
    match &user.directory_dn {
        Some(dn) => Err(refused(format!(
            "{} is a user of the directory ({dn}): change the password there",
            user.name
        ))),
        None => Ok(()),
    }
}

/// `portcullis directory relink`: the operator says that the entry now holding the name is
/// the same person as the record's. Every session of the record ends (a new entry, a new
/// start), and the sync's disabling is lifted with the next sign-in.
async fn directory_relink(config: &Config, store: &DynStore, name: &str) -> anyhow::Result<()> {
    let Some(directory) = cli_directory(config)? else {
        return Err(refused("no [directory] is configured"));
    };
    let user = find_user(store, name).await?;
    let Some(old) = user.directory_dn.clone() else {
        return Err(refused(format!("{} is a local account", user.name)));
    };
    let found = directory
        .find(&user.name)
        .await
        .map_err(|e| refused(e.to_string()))?
        .ok_or_else(|| refused(format!("the directory lets no `{}` sign in", user.name)))?;
    store
        .signout_user(user.id, now_ms())
        .await
        .map_err(store_refusal)?;
    store
        .set_directory_entry(user.id, &found.dn, found.id.as_deref())
        .await
        .map_err(store_refusal)?;
    cli_audit(
        store,
        "directory_relink",
        Some(&user),
        &format!("{old} -> {}", found.dn),
    )
    .await;
    println!(
        "{} now belongs to {} (was {old}); every session of theirs ended",
        user.name, found.dn
    );
    Ok(())
}

/// `portcullis directory check`.
async fn directory_check(config: &Config, user: Option<&str>) -> anyhow::Result<()> {
    let Some(directory) = cli_directory(config)? else {
        return Err(refused("no [directory] is configured"));
    };
    let users = directory
        .all_users()
        .await
        .map_err(|e| refused(e.to_string()))?;
    println!(
        "{}: bound as {}; {} user{} may sign in",
        directory.config.url,
        directory.config.bind_dn,
        users.users.len(),
        if users.users.len() == 1 { "" } else { "s" }
    );
    if !users.unsure.is_empty() {
        println!(
            "  not read whole (left as they are by the sync): {}",
            users.unsure.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(name) = user {
        match directory
            .find(name)
            .await
            .map_err(|e| refused(e.to_string()))?
        {
            None => {
                return Err(refused(format!(
                    "no user `{name}` may sign in (absent, disabled, or outside the user filter)"
                )))
            }
            Some(u) => {
                println!("{}: {}", u.name, u.dn);
                println!("  email: {}", u.email.as_deref().unwrap_or("-"));
                println!("  groups: {}", u.groups.join(", "));
                if let Some(admin) = u.is_admin(&directory.config) {
                    println!("  administrator: {}", if admin { "yes" } else { "no" });
                }
            }
        }
    }
    Ok(())
}

/// Reads a password from the first line of stdin, or generates one (returned for printing),
/// and checks it against the password policy.
fn new_password(
    config: &Config,
    user_name: &str,
    from_stdin: bool,
) -> anyhow::Result<(Secret, bool)> {
    if !from_stdin {
        return Ok((Secret::new(generate_password()), true));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("password (input is visible; end with Enter):");
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .context("reading the password from stdin")?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    check_policy(&config.password, user_name, &password).map_err(|e| refused(e.to_string()))?;
    Ok((Secret::new(password), false))
}

/// Prints (and audits) a new one-time link for the user.
async fn print_link(
    store: &DynStore,
    config: &Config,
    name: &str,
    purpose: LinkPurpose,
) -> anyhow::Result<()> {
    let user = find_user(store, name).await?;
    let (event, what) = match purpose {
        LinkPurpose::Password => ("reset_link_issued", "reset link"),
        LinkPurpose::Passkey => ("passkey_link_issued", "passkey link"),
        LinkPurpose::NotMe => ("not_me_link_issued", "\"this wasn't me\" link"),
    };
    let recording = cli_recording(store, event, &user, "");
    let link = crate::app::account::create_link(&recording, config, &user, purpose)
        .await
        .map_err(store_refusal)?;
    println!(
        "one-time {what} for {} (valid for {}):\n{link}",
        user.name,
        humantime::format_duration(config.auth.reset_link_ttl),
    );
    Ok(())
}

async fn find_user(store: &DynStore, name: &str) -> anyhow::Result<User> {
    store
        .find_user(name)
        .await
        .map_err(store_refusal)?
        .ok_or_else(|| refused(format!("no user named `{name}`")))
}

fn store_refusal(e: StoreError) -> anyhow::Error {
    refused(e.to_string())
}

fn time_text(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

async fn user_command(config: &Config, store: &DynStore, c: UserCommand) -> anyhow::Result<()> {
    match c {
        UserCommand::Add {
            name,
            admin,
            password_stdin,
        } => {
            if !crate::auth::valid_user_name(&name) {
                return Err(refused(format!(
                    "`{name}` is not a valid user name (1-64 of A-Z a-z 0-9 . _ - @)"
                )));
            }
            refuse_directory_name(config, &name).await?;
            let (password, generated) = new_password(config, &name, password_stdin)?;
            let hasher = Hasher::new(&config.password)?;
            let hash = hasher.hash(password.clone()).await?;
            store
                .create_user(&name, &hash, admin, now_ms())
                .await
                .map_err(store_refusal)?;
            println!("created user {name}{}", if admin { " (admin)" } else { "" });
            if generated {
                println!("password (shown only once): {}", password.expose());
            }
            Ok(())
        }
        UserCommand::Passwd {
            name,
            password_stdin,
        } => {
            let user = find_user(store, &name).await?;
            refuse_directory_user(&user)?;
            let (password, generated) = new_password(config, &user.name, password_stdin)?;
            let hasher = Hasher::new(&config.password)?;
            let hash = hasher.hash(password.clone()).await?;
            store
                .set_password(user.id, &hash)
                .await
                .map_err(store_refusal)?;
            println!("password of {} changed", user.name);
            if generated {
                println!("password (shown only once): {}", password.expose());
            }
            Ok(())
        }
        UserCommand::LinkOidc {
            name,
            provider,
            subject,
        } => {
            let Some(issuer) = config
                .oidc
                .iter()
                .find(|p| p.id == provider)
                .map(|p| p.issuer.as_str())
            else {
                return Err(refused(format!(
                    "no [[oidc]] provider has id `{provider}` in the config"
                )));
            };
            if subject.is_empty() || subject.len() > 255 {
                return Err(refused("the subject must be 1-255 characters"));
            }
            let user = find_user(store, &name).await?;
            if let Some(other) = store
                .find_oidc_link(&provider, issuer, &subject)
                .await
                .map_err(store_refusal)?
            {
                if other == user.id {
                    println!("{} is already linked to that subject", user.name);
                    return Ok(());
                }
                return Err(refused(
                    "that subject is linked to another user; unlink it there first",
                ));
            }
            match store
                .link_oidc(&provider, issuer, &subject, user.id, now_ms())
                .await
            {
                Ok(()) => {}
                Err(StoreError::Conflict(_)) => {
                    return Err(refused(format!(
                        "{} is linked to another subject at {provider}; unlink it first",
                        user.name
                    )))
                }
                Err(e) => return Err(store_refusal(e)),
            }
            cli_audit(
                store,
                "sso_link",
                Some(&user),
                &format!("provider {provider} (admin)"),
            )
            .await;
            println!("linked {} to {provider}", user.name);
            Ok(())
        }
        UserCommand::UnlinkOidc { name, provider } => {
            let user = find_user(store, &name).await?;
            if store
                .unlink_oidc(&provider, user.id)
                .await
                .map_err(store_refusal)?
            {
                cli_audit(
                    store,
                    "sso_unlink",
                    Some(&user),
                    &format!("provider {provider} (admin)"),
                )
                .await;
                println!("unlinked {} from {provider}", user.name);
                Ok(())
            } else {
                Err(refused(format!("{} has no link to {provider}", user.name)))
            }
        }
        UserCommand::Disable { name } => {
            let user = find_user(store, &name).await?;
            cli_recording(store, "admin_disable", &user, "")
                .set_disabled(user.id, true, now_ms())
                .await
                .map_err(store_refusal)?;
            println!("disabled {} and ended all of their sessions", user.name);
            Ok(())
        }
        UserCommand::Enable { name } => {
            let user = find_user(store, &name).await?;
            cli_recording(store, "admin_enable", &user, "")
                .set_disabled(user.id, false, now_ms())
                .await
                .map_err(store_refusal)?;
            println!("enabled {}", user.name);
            Ok(())
        }
        UserCommand::ResetLink { name } => {
            refuse_directory_user(&find_user(store, &name).await?)?;
            print_link(store, config, &name, LinkPurpose::Password).await
        }
        UserCommand::PasskeyLink { name } => {
            print_link(store, config, &name, LinkPurpose::Passkey).await
        }
        UserCommand::RequirePasskey { name, all, off } => {
            let (event, what) = if off {
                (
                    "passkey_not_required",
                    "may sign in with the password again",
                )
            } else {
                (
                    "passkey_required",
                    "must sign in with a passkey (registered at the next sign-in)",
                )
            };
            let user = match name {
                Some(name) if !all => Some(find_user(store, &name).await?),
                _ => None,
            };
            let n = store
                .set_passkey_required(user.as_ref().map(|u| u.id), !off)
                .await
                .map_err(store_refusal)?;
            match &user {
                Some(u) => {
                    cli_audit(store, event, Some(u), "").await;
                    println!("{} {what}", u.name);
                }
                None => {
                    cli_audit(store, event, None, "all users").await;
                    println!("{n} users {what}");
                }
            }
            Ok(())
        }
        UserCommand::RequireReset { name, all } => {
            if all {
                let n = store
                    .set_must_reset(None, true)
                    .await
                    .map_err(store_refusal)?;
                cli_audit(store, "require_reset", None, "all users").await;
                println!("{n} users must choose a new password at next login");
            } else if let Some(name) = name {
                let user = find_user(store, &name).await?;
                cli_recording(store, "require_reset", &user, "")
                    .set_must_reset(Some(user.id), true)
                    .await
                    .map_err(store_refusal)?;
                println!("{} must choose a new password at next login", user.name);
            }
            Ok(())
        }
        UserCommand::SetEmail {
            name,
            address,
            clear,
        } => {
            let user = find_user(store, &name).await?;
            let address = match (address, clear) {
                (Some(a), false) => {
                    let a = a.trim().to_string();
                    if !crate::config::mail::valid_address(&a) {
                        return Err(refused(format!(
                            "`{}` is not an email address",
                            a.escape_debug()
                        )));
                    }
                    Some(a)
                }
                (None, true) => None,
                _ => return Err(refused("give an ADDRESS, or --clear")),
            };
            store
                .set_email(user.id, address.as_deref(), now_ms())
                .await
                .map_err(store_refusal)?;
            cli_audit(
                store,
                "admin_set_email",
                Some(&user),
                address.as_deref().unwrap_or("cleared"),
            )
            .await;
            match address {
                Some(a) => println!("{}'s address is {a} (verified)", user.name),
                None => println!("{} has no address now", user.name),
            }
            Ok(())
        }
        UserCommand::Unlock { name } => {
            let user = find_user(store, &name).await?;
            cli_recording(store, "unlock", &user, "")
                .clear_failures(user.id)
                .await
                .map_err(store_refusal)?;
            println!("unlocked {}", user.name);
            Ok(())
        }
        UserCommand::List { json } => {
            let users = store.list_users().await.map_err(store_refusal)?;
            if json {
                let list: Vec<_> = users
                    .iter()
                    .map(|u| {
                        serde_json::json!({
                            "id": u.id, "name": u.name, "admin": u.is_admin,
                            "disabled": u.disabled, "created": time_text(u.created_ms),
                            "must_reset": u.must_reset, "passkey_required": u.passkey_required,
                            "directory_dn": u.directory_dn, "email": u.email,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<6} {:<9} {:<10} CREATED",
                    "NAME", "ADMIN", "DISABLED", "SOURCE"
                );
                for u in users {
                    println!(
                        "{:<24} {:<6} {:<9} {:<10} {}",
                        u.name,
                        if u.is_admin { "yes" } else { "no" },
                        if u.disabled { "yes" } else { "no" },
                        if u.directory_dn.is_some() {
                            "directory"
                        } else {
                            "local"
                        },
                        time_text(u.created_ms)
                    );
                }
            }
            Ok(())
        }
    }
}

fn session_json(s: &SessionRecord) -> serde_json::Value {
    serde_json::json!({
        "id": s.id.to_string(), "user": s.user_name, "kind": s.kind.as_str(),
        "ip": s.ip, "user_agent": s.user_agent, "created": time_text(s.created_ms),
        "last_seen": time_text(s.last_seen_ms), "expires": time_text(s.expires_ms),
    })
}

async fn session_command(store: &DynStore, c: SessionCommand) -> anyhow::Result<()> {
    match c {
        SessionCommand::List { user, json } => {
            let user_id = match user {
                Some(name) => Some(find_user(store, &name).await?.id),
                None => None,
            };
            let sessions = store
                .list_live_sessions(user_id, now_ms())
                .await
                .map_err(store_refusal)?;
            if json {
                let list: Vec<_> = sessions.iter().map(session_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<32} {:<16} {:<5} {:<15} {:<25} {:<25} DEVICE",
                    "ID", "USER", "KIND", "IP", "CREATED", "EXPIRES"
                );
                for s in sessions {
                    println!(
                        "{} {:<16} {:<5} {:<15} {:<25} {:<25} {}",
                        s.id,
                        s.user_name,
                        s.kind.as_str(),
                        s.ip,
                        time_text(s.created_ms),
                        time_text(s.expires_ms),
                        crate::web::pages::session_device(&s)
                    );
                }
            }
            Ok(())
        }
        SessionCommand::Revoke { session_id } => {
            let sid = SessionId::parse(&session_id).ok_or_else(|| {
                refused(format!(
                    "`{session_id}` is not a session id (32 hex digits)"
                ))
            })?;
            match store
                .revoke_session(sid, now_ms())
                .await
                .map_err(store_refusal)?
            {
                Some(_) => {
                    cli_audit(
                        store,
                        "admin_revoke_session",
                        None,
                        &format!("session {sid}"),
                    )
                    .await;
                    println!("session {sid} ended");
                    Ok(())
                }
                None => Err(refused(format!("no session {sid}"))),
            }
        }
    }
}

async fn plex_account(
    config: &Config,
    store: &DynStore,
    key: &str,
) -> anyhow::Result<crate::store::PlexAccount> {
    if let Some(a) = store
        .find_plex_account(key)
        .await
        .map_err(|e| refused(e.to_string()))?
    {
        return Ok(a);
    }
    // Perhaps shared at plex.tv since the gateway last asked: ask now.
    if let Err(e) = crate::app::plex::note_listed_accounts(config, store).await {
        eprintln!("portcullis: plex.tv could not be asked for the server's accounts: {e}");
    }
    store
        .find_plex_account(key)
        .await
        .map_err(|e| refused(e.to_string()))?
        .ok_or_else(|| {
            refused(format!(
                "no Plex account `{key}` has been seen (see `portcullis plex accounts`; an account \
                 appears once plex.tv lists it for the server or one of its tokens is used)"
            ))
        })
}

/// Tells the running gateways that a Plex account was linked or a device approved, so that
/// refusals they remember of its tokens end now rather than in a few seconds.
async fn plex_changed(store: &DynStore, account_id: &str) {
    let note = crate::store::MediaNote::PlexChanged {
        account_id: account_id.to_string(),
    };
    let until = now_ms() + crate::mediaserver::plex::CHANGE_NOTE_TTL.as_millis() as i64;
    if let Err(e) = store.append_media_note(&note, until, now_ms()).await {
        eprintln!(
            "portcullis: warning: the running gateway may refuse it for a few seconds more: {e}"
        );
    }
}

async fn plex_command(config: &Config, store: &DynStore, c: PlexCommand) -> anyhow::Result<()> {
    let when = |ms: Option<i64>| ms.map_or("-".to_string(), time_text);
    match c {
        PlexCommand::Accounts { json } => {
            let list = store
                .list_plex_accounts(None)
                .await
                .map_err(|e| refused(e.to_string()))?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "account_id": a.account_id, "username": a.username, "title": a.title,
                            "user": a.user_name, "linked_ms": a.linked_ms,
                            "last_seen_ms": a.last_seen_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<12} {:<24} {:<20} LAST SEEN",
                    "ACCOUNT", "PLEX USER", "LINKED TO"
                );
                for a in list {
                    println!(
                        "{:<12} {:<24} {:<20} {}",
                        a.account_id,
                        a.username,
                        a.user_name.as_deref().unwrap_or("-"),
                        when(Some(a.last_seen_ms))
                    );
                }
            }
            Ok(())
        }
        PlexCommand::Link {
            user,
            plex_account: key,
        } => {
            let account = plex_account(config, store, &key).await?;
            let u = store
                .find_user(&user)
                .await
                .map_err(|e| refused(e.to_string()))?
                .ok_or_else(|| refused(format!("no user `{user}`")))?;
            store
                .link_plex_account(&account.account_id, u.id, now_ms())
                .await
                .map_err(|e| refused(e.to_string()))?;
            plex_changed(store, &account.account_id).await;
            let detail = format!("plex account {} ({})", account.username, account.account_id);
            cli_audit(store, "plex_linked", Some(&u), &detail).await;
            println!("{detail} linked to {}", u.name);
            Ok(())
        }
        PlexCommand::Unlink { plex_account: key } => {
            let account = plex_account(config, store, &key).await?;
            let ended = store
                .unlink_plex_account(&account.account_id, now_ms())
                .await
                .map_err(|e| refused(e.to_string()))?
                .ok_or_else(|| refused(format!("Plex account {key} is not linked")))?;
            let detail = format!(
                "plex account {} ({}); {} token(s) ended",
                account.username,
                account.account_id,
                ended.len()
            );
            cli_audit(store, "plex_unlinked", None, &detail).await;
            println!("unlinked {detail}");
            Ok(())
        }
        PlexCommand::Devices { user, json } => {
            let user_id = match user {
                Some(name) => Some(
                    store
                        .find_user(&name)
                        .await
                        .map_err(|e| refused(e.to_string()))?
                        .ok_or_else(|| refused(format!("no user `{name}`")))?
                        .id,
                ),
                None => None,
            };
            let list = store
                .list_plex_devices(user_id)
                .await
                .map_err(|e| refused(e.to_string()))?;
            if json {
                let rows: Vec<_> = list
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "account_id": d.account_id, "client_id": d.client_id,
                            "product": d.product, "device_name": d.device_name,
                            "platform": d.platform, "ip": d.ip,
                            "approved": d.approved_ms.is_some(), "last_seen_ms": d.last_seen_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<12} {:<38} {:<30} {:<9} LAST SEEN",
                    "ACCOUNT", "CLIENT ID", "APP ON DEVICE", "APPROVED"
                );
                for d in list {
                    println!(
                        "{:<12} {:<38} {:<30} {:<9} {} from {}",
                        d.account_id,
                        d.client_id,
                        format!("{} on {}", d.product, d.device_name),
                        if d.approved_ms.is_some() {
                            "yes"
                        } else {
                            "pending"
                        },
                        when(Some(d.last_seen_ms)),
                        d.ip
                    );
                }
            }
            Ok(())
        }
        PlexCommand::Approve {
            plex_account: key,
            client_id,
        } => {
            let account = plex_account(config, store, &key).await?;
            let Some(user_id) = account.user_id else {
                return Err(refused(format!(
                    "Plex account {key} is not linked to a gateway user; link it first"
                )));
            };
            if !store
                .approve_plex_device(&account.account_id, &client_id, user_id, now_ms())
                .await
                .map_err(|e| refused(e.to_string()))?
            {
                return Err(refused(format!(
                    "no device {client_id} of Plex account {key}"
                )));
            }
            plex_changed(store, &account.account_id).await;
            let u = store.find_user_by_id(user_id).await.ok().flatten();
            let detail = format!("plex account {}, device {client_id}", account.account_id);
            cli_audit(store, "plex_device_approved", u.as_ref(), &detail).await;
            println!("approved {detail}");
            Ok(())
        }
        PlexCommand::Revoke {
            plex_account: key,
            client_id,
        } => {
            let account = plex_account(config, store, &key).await?;
            let ended = store
                .revoke_plex_device(&account.account_id, &client_id, now_ms())
                .await
                .map_err(|e| refused(e.to_string()))?
                .ok_or_else(|| refused(format!("no device {client_id} of Plex account {key}")))?;
            let u = match account.user_id {
                Some(id) => store.find_user_by_id(id).await.ok().flatten(),
                None => None,
            };
            let detail = format!(
                "plex account {}, device {client_id}; {} token(s) ended",
                account.account_id,
                ended.len()
            );
            cli_audit(store, "plex_device_revoked", u.as_ref(), &detail).await;
            println!("revoked {detail}");
            Ok(())
        }
        PlexCommand::Check => {
            let client = crate::mediaserver::upstream::MediaClient::new();
            let mut fatal = false;
            let routes: Vec<_> = config.routes.iter().filter(|r| r.plex.is_some()).collect();
            if routes.is_empty() {
                return Err(refused("no plex route is configured"));
            }
            for route in routes {
                match crate::app::plex::self_check_route(&client, route, &config.server.public_url)
                    .await
                {
                    Ok(report) => {
                        match &report.fatal {
                            Some(f) => {
                                fatal = true;
                                println!("route {}: FATAL: {f}", route.name);
                            }
                            None => println!("route {}: the server needs a token from the gateway too (allowedNetworks does not cover it)", route.name),
                        }
                        for w in &report.warnings {
                            println!("route {}: warning: {w}", route.name);
                        }
                        if report.fatal.is_none() && report.warnings.is_empty() {
                            println!("route {}: ok: Remote Access, Relay and GDM are off and the custom server access URL is the gateway", route.name);
                        }
                    }
                    Err(e) => {
                        fatal = true;
                        println!("route {}: cannot check: {e}", route.name);
                    }
                }
            }
            if fatal {
                return Err(refused("the Plex self-check found a problem (above)"));
            }
            Ok(())
        }
        PlexCommand::RevokeUpstream { plex_account: key } => {
            let revocation = crate::app::plex::revoke_upstream(config, store, &key)
                .await
                .map_err(|e| refused(e.to_string()))?;
            let user = match revocation.account.user_id {
                Some(id) => store.find_user_by_id(id).await.ok().flatten(),
                None => None,
            };
            let r = cli_record_as(
                "plex_revoked_upstream",
                revocation.outcome(),
                user.as_ref(),
                &revocation.detail("cli"),
            );
            if let Err(e) = store.append_audit_with(&r.entry, &r.outbox).await {
                eprintln!("portcullis: warning: the audit log could not be written: {e}");
            }
            if revocation.done.is_empty() && revocation.failed.is_none() {
                println!("{}", crate::app::plex::NOTHING_UPSTREAM);
            }
            for line in &revocation.done {
                println!("{line}");
            }
            match revocation.failed {
                Some(e) => Err(refused(format!("then stopped: {e}"))),
                None => Ok(()),
            }
        }
    }
}

/// Records an operator's CLI action in the audit log (the CLI has no IP or session).
async fn cli_audit(store: &DynStore, event: &str, user: Option<&User>, detail: &str) {
    let r = cli_record(event, user, detail);
    if let Err(e) = store.append_audit_with(&r.entry, &r.outbox).await {
        eprintln!("portcullis: warning: the audit log could not be written: {e}");
    }
}

/// A store that writes the audit entry of an operator's change, and the notices of it, in the
/// change's own transaction.
fn cli_recording(store: &DynStore, event: &str, user: &User, detail: &str) -> DynStore {
    store.recording(cli_record(event, Some(user), detail))
}

/// The audit entry of an operator's action and the messages that tell of it: the user is told,
/// as when the same is done at the admin page (the running gateway's outbox sends it), and the
/// webhooks that asked for the event.
fn cli_record(event: &str, user: Option<&User>, detail: &str) -> Record {
    cli_record_as(event, "success", user, detail)
}

/// [`cli_record`] of an action that ended with `outcome`.
fn cli_record_as(event: &str, outcome: &str, user: Option<&User>, detail: &str) -> Record {
    let entry = AuditEntry {
        at_ms: now_ms(),
        event: event.to_string(),
        outcome: outcome.to_string(),
        user_id: user.map(|u| u.id),
        user_name: user.map(|u| u.name.clone()).unwrap_or_default(),
        ip: "cli".to_string(),
        detail: detail.to_string(),
        ..AuditEntry::default()
    };
    tracing::info!(target: "portcullis::audit", event, user = %entry.user_name, detail, "cli");
    let mut outbox: Vec<_> = crate::app::outbox::notice_for(&entry, user)
        .into_iter()
        .collect();
    if let (Some(kind), Some(hooks)) = (
        crate::app::outbox::notice_kind(&entry.event, &entry.outcome),
        WEBHOOKS.get(),
    ) {
        outbox.extend(crate::app::outbox::webhook_messages(
            hooks, kind, user, &entry,
        ));
    }
    Record { entry, outbox }
}

async fn breach(
    config: &Config,
    store: &DynStore,
    require_passkey: bool,
    notify: bool,
) -> anyhow::Result<()> {
    if notify && config.mail.is_none() {
        return Err(refused("--notify needs [mail] in the config"));
    }
    let entry = AuditEntry {
        at_ms: now_ms(),
        event: "breach_response".to_string(),
        outcome: "success".to_string(),
        ip: "cli".to_string(),
        ..AuditEntry::default()
    };
    let report =
        crate::app::account::breach_response(config, store, require_passkey, notify, entry)
            .await
            .map_err(|e| refused(e.to_string()))?;
    println!("breach response done:");
    println!("  - every session of every user is signed out");
    println!(
        "  - {} users must choose a new password at next login",
        report.users_reset
    );
    if require_passkey {
        println!(
            "  - every user must register a passkey at next login and sign in with it from then on"
        );
    }
    println!(
        "  - {} single sign-on links removed (users link their provider account again)",
        report.oidc_links_removed
    );
    println!(
        "  - session signing key replaced: new key {}, retired {} (tokens they signed no longer work anywhere)",
        report.new_kid,
        report.retired_kids.join(", ")
    );
    if notify {
        println!(
            "  - {} users with a verified address are mailed what happened and what to do (by the running gateway's outbox)",
            report.users_notified
        );
    }
    println!("  running gateways apply this at once (at the latest within their poll interval)");
    Ok(())
}

async fn mail_command(config: &Config, store: &DynStore, c: MailCommand) -> anyhow::Result<()> {
    match c {
        MailCommand::Test { address } => {
            let Some(mail) = &config.mail else {
                return Err(refused("no [mail] is configured"));
            };
            if !crate::config::mail::valid_address(&address) {
                return Err(refused(format!(
                    "`{}` is not an email address",
                    address.escape_debug()
                )));
            }
            let mailer = crate::mail::Mailer::new(mail)
                .map_err(|(key, problem)| refused(format!("key `{key}`: {problem}")))?;
            let vars = std::collections::BTreeMap::from([(
                "gateway",
                config.server.public_url.trim_end_matches('/').to_string(),
            )]);
            let message = mailer.render("test", &vars).map_err(refused)?;
            mailer.send(&address, &message).await.map_err(|e| {
                refused(format!(
                    "{}:{} did not take the message: {e}",
                    mail.host, mail.port
                ))
            })?;
            println!(
                "sent a test message to {address} through {}:{}",
                mail.host, mail.port
            );
            Ok(())
        }
        MailCommand::Outbox { limit, json } => {
            let rows = store.list_outbox(limit).await.map_err(store_refusal)?;
            let state = |sent: Option<i64>, failed: Option<i64>| match (sent, failed) {
                (Some(_), _) => "sent",
                (None, Some(_)) => "failed",
                (None, None) => "queued",
            };
            if json {
                let list: Vec<_> = rows
                    .iter()
                    .map(|(m, sent, failed)| {
                        serde_json::json!({
                            "id": m.id, "channel": m.channel, "kind": m.kind,
                            "user_id": m.user_id, "address": m.address,
                            "state": state(*sent, *failed), "attempts": m.attempts,
                            "created": time_text(m.created_ms),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<8} {:<26} {:<8} {:<8} CREATED",
                    "ID", "KIND", "STATE", "ATTEMPTS"
                );
                for (m, sent, failed) in rows {
                    println!(
                        "{:<8} {:<26} {:<8} {:<8} {}",
                        m.id,
                        m.kind,
                        state(sent, failed),
                        m.attempts,
                        time_text(m.created_ms)
                    );
                }
            }
            Ok(())
        }
    }
}

async fn rotate_keys(config: &Config, store: &DynStore) -> anyhow::Result<()> {
    if config.session.key_override.is_some() {
        return Err(refused(
            "the signing key comes from PORTCULLIS_SESSION_KEY; rotate it there",
        ));
    }
    let (kid, old) = crate::auth::token::rotate_key_file(&config.session.key_file, false)
        .map_err(|e| refused(e.to_string()))?;
    cli_audit(
        store,
        "key_rotation",
        None,
        &format!("new key {kid}, kept {old:?}"),
    )
    .await;
    println!(
        "new signing key {kid}; kept {} older key(s) for verifying sessions they signed",
        old.len()
    );
    println!("running gateways load it within their poll interval; nobody is signed out");
    Ok(())
}

async fn audit(
    store: &DynStore,
    user: Option<String>,
    since: Option<std::time::Duration>,
    json: bool,
    limit: i64,
) -> anyhow::Result<()> {
    let user_id = match user {
        Some(name) => Some(find_user(store, &name).await?.id),
        None => None,
    };
    let since_ms = since.map_or(0, |d| now_ms() - d.as_millis() as i64);
    let entries = store
        .list_audit(user_id, since_ms, limit.clamp(1, 100_000))
        .await
        .map_err(store_refusal)?;
    if json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "time": time_text(e.at_ms), "event": e.event, "outcome": e.outcome,
                    "user": e.user_name, "ip": e.ip, "user_agent": e.user_agent,
                    "session_id": e.session_id, "detail": e.detail,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for e in entries {
            println!(
                "{} {:<22} {:<12} {:<16} {:<15} {}",
                time_text(e.at_ms),
                e.event,
                e.outcome,
                if e.user_name.is_empty() {
                    "-"
                } else {
                    &e.user_name
                },
                if e.ip.is_empty() { "-" } else { &e.ip },
                e.detail
            );
        }
    }
    Ok(())
}

async fn signout(store: &DynStore, a: SignoutArgs) -> anyhow::Result<()> {
    if a.everyone {
        store
            .signout_everyone(now_ms())
            .await
            .map_err(store_refusal)?;
        cli_audit(store, "signout_everyone", None, "").await;
        println!("signed out every device of every user");
        return Ok(());
    }
    let Some(name) = a.user else {
        return Err(refused("name --user NAME or --everyone"));
    };
    let user = find_user(store, &name).await?;
    cli_recording(store, "signout_all_devices", &user, "by an operator")
        .signout_user(user.id, now_ms())
        .await
        .map_err(store_refusal)?;
    println!("signed out every device of {}", user.name);
    Ok(())
}

/// `backup` and `restore` (see `crate::backup`): they open the store themselves.
fn backup_command(config: Config, command: Command) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let refuse = |e: crate::backup::BackupError| refused(e.to_string());
    match command {
        Command::Backup { out } => {
            let r = rt
                .block_on(crate::backup::backup(&config, &out))
                .map_err(refuse)?;
            let m = &r.manifest;
            let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
            println!(
                "backup written to {} ({} bytes, {} users, schema {}, copied in {} ms, {} ms in all)",
                r.path.display(),
                r.bytes,
                m.users,
                m.schema_version,
                r.copy_time.as_millis(),
                r.total_time.as_millis()
            );
            println!("  holds: manifest.json, {}", names.join(", "));
            println!(
                "  it holds password hashes, 2FA secrets and the keys that unlock them: keep it as secret as the keys (mode 0600)"
            );
            for n in &r.notes {
                println!("  note: {n}");
            }
            Ok(())
        }
        Command::Restore {
            file,
            keep_sessions,
            force,
        } => {
            let opts = crate::backup::RestoreOptions {
                keep_sessions,
                force,
            };
            if keep_sessions {
                eprintln!(
                    "portcullis: warning: --keep-sessions: every session and media token that was live when the backup was taken works again, including any signed out since; use it only for a backup taken moments ago"
                );
            }
            let r = rt
                .block_on(crate::backup::restore(&config, &file, opts))
                .map_err(refuse)?;
            let m = &r.manifest;
            println!(
                "restored a backup made {} by Portcullis {} (schema {}, {} users)",
                time_text(m.created_ms),
                m.portcullis_version,
                m.schema_version,
                m.users
            );
            for (from, to) in &r.moved_aside {
                println!("  moved aside: {} -> {}", from.display(), to.display());
            }
            for w in &r.written {
                println!("  wrote {}", w.display());
            }
            for n in &r.notes {
                println!("  note: {n}");
            }
            if r.sessions_ended {
                println!(
                    "every session and media token from before the backup is ended: everyone signs in again (media apps too)"
                );
            } else {
                println!("sessions from the backup were kept (--keep-sessions)");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
