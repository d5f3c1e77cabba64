//! A real OpenLDAP `slapd` (Debian's package) for the tests, configured from scratch by this
//! harness in a temporary directory and listening on ephemeral loopback ports:
//! `ldap://` (with StartTLS) and `ldaps://`, with a test CA made by rcgen.
//!
//! The directory is `dc=example,dc=org` in an `mdb` database with the `memberof` overlay
//! (`groupOfNames`/`member` gives users `memberOf`) and the `ppolicy` overlay (a user with
//! `pwdAccountLockedTime` cannot bind). A read-only service account,
//! `cn=portcullis,ou=services,dc=example,dc=org`, may read everything but passwords, including
//! the operational attributes `memberOf` and `pwdAccountLockedTime`; users may bind with their
//! own password. Every change goes through the real `ldapmodify` as the rootdn, and readiness is
//! polled with the real `ldapwhoami` (no fixed sleeps).

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::harness::{free_port, poll_until, write_certificates, write_private};

const SLAPD: &str = "/usr/sbin/slapd";
const SLAPADD: &str = "/usr/sbin/slapadd";
const BASE_DN: &str = "dc=example,dc=org";
const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
const SERVICE_DN: &str = "cn=portcullis,ou=services,dc=example,dc=org";
/// The ppolicy overlay's default policy (see [`initial_tree`]).
const POLICY_DN: &str = "cn=default,ou=policies,dc=example,dc=org";
/// The `pwdAccountLockedTime` value that ppolicy reads as "locked by an administrator, for good".
const LOCKED_FOREVER: &str = "000001010000Z";
/// How long slapd may take to answer after it is started.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long one client tool (`ldapmodify`, `ldapwhoami`, ...) may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `slapd` with its own configuration, database and certificates in a temporary
/// directory. Dropping it kills slapd; the directory goes with it.
pub struct Slapd {
    /// `ldap://127.0.0.1:P1` (plain; StartTLS is offered).
    pub ldap_url: String,
    /// `ldaps://127.0.0.1:P2` (TLS from the first byte).
    pub ldaps_url: String,
    /// The test CA (PEM) that signed slapd's certificate (SANs `localhost` and `127.0.0.1`).
    pub ca_file: PathBuf,
    /// `dc=example,dc=org`.
    pub base_dn: String,
    /// The read-only service account the gateway binds as.
    pub service_dn: String,
    pub service_password: String,
    /// A file holding `service_password` (no trailing newline), mode 0600.
    pub service_password_file: PathBuf,
    dir: tempfile::TempDir,
    admin_password: String,
    child: Option<Child>,
}

impl Slapd {
    /// Configures and starts slapd; it serves on both URLs, with the initial tree, when this
    /// returns.
    pub async fn start() -> Slapd {
        let dir = tempfile::Builder::new()
            .prefix("slapd-")
            .tempdir()
            .expect("a temporary directory for slapd");
        let ca_file = write_certificates(dir.path(), "Portcullis test LDAP CA");
        let admin_password = random_password();
        let service_password = random_password();
        let service_password_file = dir.path().join("service.password");
        write_private(&service_password_file, service_password.as_bytes());

        // cn=config is built offline with slapadd from an LDIF written here, exactly as an
        // administrator would bootstrap a fresh server.
        let config_ldif = dir.path().join("config.ldif");
        std::fs::write(&config_ldif, config_ldif_text(dir.path(), &admin_password))
            .expect("write config.ldif");
        std::fs::create_dir(dir.path().join("slapd.d")).expect("create slapd.d");
        std::fs::create_dir(dir.path().join("db")).expect("create the database directory");
        let out = Command::new(SLAPADD)
            .args(["-n0", "-F"])
            .arg(dir.path().join("slapd.d"))
            .arg("-l")
            .arg(&config_ldif)
            .stdin(Stdio::null())
            .output()
            .expect("run slapadd (is the slapd package installed?)");
        assert!(
            out.status.success(),
            "slapadd could not load the configuration:\n{}",
            describe(&out)
        );

        let mut slapd = Slapd {
            ldap_url: String::new(),
            ldaps_url: String::new(),
            ca_file,
            base_dn: BASE_DN.to_string(),
            service_dn: SERVICE_DN.to_string(),
            service_password,
            service_password_file,
            dir,
            admin_password,
            child: None,
        };
        // The ports are picked free, released, and taken by slapd: another process may take
        // one in between, in which case slapd exits at once and is tried again on new ports.
        let mut started = false;
        for _ in 0..5 {
            let (ldap_port, ldaps_port) = (free_port(), free_port());
            slapd.ldap_url = format!("ldap://127.0.0.1:{ldap_port}");
            slapd.ldaps_url = format!("ldaps://127.0.0.1:{ldaps_port}");
            if slapd.spawn().await {
                started = true;
                break;
            }
            if !slapd.log().contains("Address already in use") {
                panic!("slapd did not start:\n{}", slapd.log());
            }
        }
        assert!(started, "no free ports for slapd:\n{}", slapd.log());

        let tree = initial_tree(&slapd.service_password);
        slapd.ldapmodify(&tree).await;
        slapd
    }

    /// The DN of the user `uid` (the value escaped as RFC 4514 requires).
    pub fn user_dn(&self, uid: &str) -> String {
        format!("uid={},ou=people,{BASE_DN}", escape_dn_value(uid))
    }

    /// The DN of the group `cn`.
    fn group_dn(&self, cn: &str) -> String {
        format!("cn={},ou=groups,{BASE_DN}", escape_dn_value(cn))
    }

    /// Adds an `inetOrgPerson` `uid` (cn and sn are the uid, mail `<uid>@example.org`) whose
    /// password is `password` (stored salted and hashed, `{SSHA}`).
    pub async fn add_user(&self, uid: &str, password: &str) {
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", &self.user_dn(uid));
        ldif_line(&mut ldif, "changetype", "add");
        ldif_line(&mut ldif, "objectClass", "inetOrgPerson");
        ldif_line(&mut ldif, "uid", uid);
        ldif_line(&mut ldif, "cn", uid);
        ldif_line(&mut ldif, "sn", uid);
        ldif_line(&mut ldif, "mail", &format!("{uid}@example.org"));
        ldif_line(&mut ldif, "userPassword", &ssha(password));
        self.ldapmodify(&ldif).await;
    }

    /// Deletes the user `uid` after taking them out of their groups (where they were the last
    /// member, the service account takes their place).
    pub async fn delete_user(&self, uid: &str) {
        // The memberof overlay's own clean-up on delete cannot empty a groupOfNames: it would log
        // the schema violation and leave the deleted DN in the group (and a user re-added under
        // that uid would be a member without memberOf). Hence the groups are left first.
        let dn = self.user_dn(uid);
        for group in self.read_as_admin(&dn, "memberOf").await {
            self.remove_member(&group, &dn).await;
        }
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", &dn);
        ldif_line(&mut ldif, "changetype", "delete");
        self.ldapmodify(&ldif).await;
    }

    /// Replaces the password of `uid`, as an administrator would.
    pub async fn set_password(&self, uid: &str, password: &str) {
        let ldif = self.modification(
            &self.user_dn(uid),
            "replace",
            "userPassword",
            &ssha(password),
        );
        self.ldapmodify(&ldif).await;
    }

    /// Adds the `groupOfNames` `cn=<cn>,ou=groups,...` with the users `members` (uids).
    /// `groupOfNames` needs at least one member: an empty group holds the service account as a
    /// placeholder (which therefore gets the group in its own `memberOf`).
    pub async fn add_group(&self, cn: &str, members: &[&str]) {
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", &self.group_dn(cn));
        ldif_line(&mut ldif, "changetype", "add");
        ldif_line(&mut ldif, "objectClass", "groupOfNames");
        ldif_line(&mut ldif, "cn", cn);
        if members.is_empty() {
            ldif_line(&mut ldif, "member", SERVICE_DN);
        }
        for uid in members {
            ldif_line(&mut ldif, "member", &self.user_dn(uid));
        }
        self.ldapmodify(&ldif).await;
    }

    /// Adds the user `uid` to the group `cn`.
    pub async fn add_to_group(&self, cn: &str, uid: &str) {
        let ldif = self.modification(&self.group_dn(cn), "add", "member", &self.user_dn(uid));
        self.ldapmodify(&ldif).await;
    }

    /// Removes the user `uid` from the group `cn`. If `uid` was the last member, the service
    /// account takes its place (a `groupOfNames` cannot be empty).
    pub async fn remove_from_group(&self, cn: &str, uid: &str) {
        self.remove_member(&self.group_dn(cn), &self.user_dn(uid))
            .await;
    }

    /// Removes `member` from the group `group` (DNs); the service account takes the place of
    /// the last member.
    async fn remove_member(&self, group: &str, member: &str) {
        let ldif = self.modification(group, "delete", "member", member);
        let out = self.run_ldapmodify(&ldif).await;
        if out.status.success() {
            return;
        }
        // 65 is objectClassViolation: the group would have no member left.
        if out.status.code() == Some(65) {
            let mut ldif = self.modification(group, "delete", "member", member);
            ldif.push_str("-\n");
            ldif_line(&mut ldif, "add", "member");
            ldif_line(&mut ldif, "member", SERVICE_DN);
            self.ldapmodify(&ldif).await;
            return;
        }
        self.fail("ldapmodify", &ldif, &out);
    }

    /// Locks `uid` for good (`pwdAccountLockedTime: 000001010000Z`): ppolicy refuses their binds.
    pub async fn lock_user(&self, uid: &str) {
        let ldif = self.modification(
            &self.user_dn(uid),
            "replace",
            "pwdAccountLockedTime",
            LOCKED_FOREVER,
        );
        self.ldapmodify(&ldif).await;
    }

    /// Unlocks `uid` (removes `pwdAccountLockedTime`; nothing happens if it was not set).
    pub async fn unlock_user(&self, uid: &str) {
        // A `replace` without values deletes the attribute and, unlike `delete`, does not fail
        // when it is absent.
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", &self.user_dn(uid));
        ldif_line(&mut ldif, "changetype", "modify");
        ldif_line(&mut ldif, "replace", "pwdAccountLockedTime");
        self.ldapmodify(&ldif).await;
    }

    /// Stops slapd at once (SIGKILL) and waits for it to exit. The data stays for [`restart`].
    ///
    /// [`restart`]: Slapd::restart
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts slapd again on the same ports with the same configuration and data (killing it
    /// first if it still runs); it serves when this returns.
    pub async fn restart(&mut self) {
        self.kill();
        if !self.spawn().await {
            panic!("slapd did not restart:\n{}", self.log());
        }
    }

    /// Applies `ldif` (changetype records, or plain entries to add) with `ldapmodify` as the
    /// rootdn; panics with the tool's and slapd's output if it fails. Blocking: for odd cases
    /// the other methods do not cover.
    pub fn modify(&self, ldif: &str) {
        let mut child = Command::new("ldapmodify")
            .args(self.admin_args())
            .arg("-a")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ldapmodify (is ldap-utils installed?)");
        child
            .stdin
            .take()
            .expect("ldapmodify's stdin")
            .write_all(ldif.as_bytes())
            .expect("write to ldapmodify");
        let out = child.wait_with_output().expect("wait for ldapmodify");
        if !out.status.success() {
            self.fail("ldapmodify", ldif, &out);
        }
    }

    /// slapd's own output (errors and start/stop notices), for diagnostics.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default()
    }

    /// The values of `attr` on the entry `dn`, read by the rootdn (empty if the entry does not
    /// exist).
    async fn read_as_admin(&self, dn: &str, attr: &str) -> Vec<String> {
        let mut cmd = tokio::process::Command::new("ldapsearch");
        cmd.args(self.admin_args())
            .args(["-LLL", "-o", "ldif-wrap=no", "-s", "base", "-b", dn])
            .args(["(objectClass=*)", attr]);
        let out = run_tool(cmd, None).await;
        // 32 is noSuchObject.
        if !out.status.success() && out.status.code() != Some(32) {
            self.fail("ldapsearch", dn, &out);
        }
        ldif_values(&String::from_utf8_lossy(&out.stdout), attr)
    }

    /// An LDIF record making one change to one attribute of `dn`.
    fn modification(&self, dn: &str, op: &str, attr: &str, value: &str) -> String {
        let mut ldif = String::new();
        ldif_line(&mut ldif, "dn", dn);
        ldif_line(&mut ldif, "changetype", "modify");
        ldif_line(&mut ldif, op, attr);
        ldif_line(&mut ldif, attr, value);
        ldif
    }

    /// Client tool arguments: a simple bind as the rootdn over `ldap://`.
    fn admin_args(&self) -> Vec<String> {
        self.admin_args_on(&self.ldap_url)
    }

    /// Client tool arguments: a simple bind as the rootdn on `url`.
    fn admin_args_on(&self, url: &str) -> Vec<String> {
        [
            "-x",
            "-H",
            url,
            "-D",
            ADMIN_DN,
            "-w",
            &self.admin_password,
            "-o",
            "nettimeout=10",
        ]
        .map(String::from)
        .to_vec()
    }

    /// Applies `ldif` with `ldapmodify` as the rootdn, panicking if it fails.
    async fn ldapmodify(&self, ldif: &str) {
        let out = self.run_ldapmodify(ldif).await;
        if !out.status.success() {
            self.fail("ldapmodify", ldif, &out);
        }
    }

    /// Runs `ldapmodify -a` as the rootdn on `ldif` and returns its output, whatever it is.
    async fn run_ldapmodify(&self, ldif: &str) -> Output {
        let mut cmd = tokio::process::Command::new("ldapmodify");
        cmd.args(self.admin_args()).arg("-a");
        run_tool(cmd, Some(ldif)).await
    }

    fn fail(&self, tool: &str, input: &str, out: &Output) -> ! {
        panic!(
            "{tool} failed on:\n{input}\n{}\nslapd's log:\n{}",
            describe(out),
            self.log()
        );
    }

    /// Starts slapd on the current ports and waits until it answers the rootdn's bind on both
    /// `ldap://` and `ldaps://`. Returns false if slapd exited first (its log says why).
    async fn spawn(&mut self) -> bool {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("slapd.log"))
            .expect("slapd's log file");
        let log2 = log.try_clone().expect("slapd's log file");
        // `-d none`: stay in the foreground (so the child is slapd itself and can be killed),
        // printing only errors and start/stop notices (`-d 0` prints nothing at all, not even
        // why it failed to start).
        let child = Command::new(SLAPD)
            .arg("-d")
            .arg("none")
            .arg("-h")
            .arg(format!("{}/ {}/", self.ldap_url, self.ldaps_url))
            .arg("-F")
            .arg(self.dir.path().join("slapd.d"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("start slapd (is the slapd package installed?)");
        self.child = Some(child);

        let on_ldap = self.admin_args_on(&self.ldap_url);
        let on_ldaps = self.admin_args_on(&self.ldaps_url);
        let mut exited = false;
        let ready = poll_until(READY_WITHIN, || {
            let exited_now = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            exited |= exited_now;
            // The rootdn's bind is answered on both URLs (a bare TCP connection would not do:
            // the kernel accepts connections before slapd serves them).
            let mut plain = tokio::process::Command::new("ldapwhoami");
            plain.args(&on_ldap);
            let mut tls = tokio::process::Command::new("ldapwhoami");
            tls.args(&on_ldaps).env("LDAPTLS_CACERT", &self.ca_file);
            async move {
                if exited_now {
                    return true;
                }
                run_tool(plain, None).await.status.success()
                    && run_tool(tls, None).await.status.success()
            }
        })
        .await;
        if exited {
            self.child = None;
            return false;
        }
        if !ready {
            self.kill();
            panic!(
                "slapd did not answer within {READY_WITHIN:?}:\n{}",
                self.log()
            );
        }
        true
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a client tool (killed if it takes longer than [`TOOL_TIMEOUT`]), feeding it `stdin`.
async fn run_tool(mut cmd: tokio::process::Command, stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt as _;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .expect("run an LDAP client tool (is ldap-utils installed?)");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("the tool's stdin");
        pipe.write_all(text.as_bytes())
            .await
            .expect("write to the tool");
        drop(pipe);
    }
    tokio::time::timeout(TOOL_TIMEOUT, child.wait_with_output())
        .await
        .expect("the LDAP client tool did not finish in time")
        .expect("wait for the LDAP client tool")
}

/// The exit status and both outputs of a tool, for assertion messages.
fn describe(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn random_password() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The whole `cn=config` for `slapadd -n0`: TLS files, modules, schemas, and the `mdb` database
/// with its ACLs and the memberof and ppolicy overlays. Paths are under `dir`.
fn config_ldif_text(dir: &Path, admin_password: &str) -> String {
    let dir = dir.display();
    let root_pw = ssha(admin_password);
    // The schema files are pulled in with `include:`, which slapadd reads like Debian's own
    // postinst does. ppolicy's schema is built into the overlay since OpenLDAP 2.5 (and
    // memberOf into memberof), so neither has a file here.
    format!(
        "\
dn: cn=config
objectClass: olcGlobal
cn: config
olcLogLevel: none
olcTLSCACertificateFile: {dir}/ca.pem
olcTLSCertificateFile: {dir}/server.pem
olcTLSCertificateKeyFile: {dir}/server.key

dn: cn=module{{0}},cn=config
objectClass: olcModuleList
cn: module{{0}}
olcModulePath: /usr/lib/ldap
olcModuleLoad: back_mdb
olcModuleLoad: memberof
olcModuleLoad: ppolicy

dn: cn=schema,cn=config
objectClass: olcSchemaConfig
cn: schema

include: file:///etc/ldap/schema/core.ldif

include: file:///etc/ldap/schema/cosine.ldif

include: file:///etc/ldap/schema/inetorgperson.ldif

include: file:///etc/ldap/schema/nis.ldif

# The root DSE and the schema are public, as on any server (clients may discover them).
dn: olcDatabase={{-1}}frontend,cn=config
objectClass: olcDatabaseConfig
objectClass: olcFrontendConfig
olcDatabase: {{-1}}frontend
olcAccess: {{0}}to dn.base=\"\" by * read
olcAccess: {{1}}to dn.base=\"cn=Subschema\" by * read

dn: olcDatabase={{0}}config,cn=config
objectClass: olcDatabaseConfig
olcDatabase: {{0}}config

# Users bind with (and may change) their own password, which nobody else may read; the
# service account reads everything else, operational attributes included; the rootdn is not
# subject to ACLs. No sync to disk: a killed slapd still keeps what it committed (the pages
# are in the kernel's cache), and the tests do not survive the machine crashing anyway.
dn: olcDatabase={{1}}mdb,cn=config
objectClass: olcDatabaseConfig
objectClass: olcMdbConfig
olcDatabase: {{1}}mdb
olcSuffix: {BASE_DN}
olcRootDN: {ADMIN_DN}
olcRootPW: {root_pw}
olcDbDirectory: {dir}/db
olcDbNoSync: TRUE
olcDbIndex: objectClass eq
olcDbIndex: uid eq
olcDbIndex: member eq
olcAccess: {{0}}to attrs=userPassword by self write by anonymous auth by * none
olcAccess: {{1}}to * by dn.exact=\"{SERVICE_DN}\" read by self read by * none

# groupOfNames/member gives each member memberOf; deleting a user drops them from groups.
dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcMemberOf
olcOverlay: {{0}}memberof
olcMemberOfGroupOC: groupOfNames
olcMemberOfMemberAD: member
olcMemberOfMemberOfAD: memberOf
olcMemberOfRefInt: TRUE

# ppolicy refuses binds of locked accounts only where a policy with pwdLockout applies:
# the default policy (added with the tree) is that policy.
dn: olcOverlay={{1}}ppolicy,olcDatabase={{1}}mdb,cn=config
objectClass: olcOverlayConfig
objectClass: olcPPolicyConfig
olcOverlay: {{1}}ppolicy
olcPPolicyDefault: {POLICY_DN}
olcPPolicyUseLockout: TRUE
"
    )
}

/// The initial tree: the base, `ou=policies` with ppolicy's default policy (first: until it
/// exists, ppolicy logs a complaint about every change),
/// `ou=people`, `ou=groups`, and `ou=services` with the service account.
fn initial_tree(service_password: &str) -> String {
    // pwdLockout: TRUE is what makes ppolicy honour pwdAccountLockedTime at bind; with no
    // pwdMaxFailure, failed binds never lock anyone by themselves.
    format!(
        "\
dn: {BASE_DN}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: ou=policies,{BASE_DN}
objectClass: organizationalUnit
ou: policies

dn: {POLICY_DN}
objectClass: organizationalRole
objectClass: pwdPolicy
cn: default
pwdAttribute: userPassword
pwdLockout: TRUE

dn: ou=people,{BASE_DN}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{BASE_DN}
objectClass: organizationalUnit
ou: groups

dn: ou=services,{BASE_DN}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: applicationProcess
objectClass: simpleSecurityObject
cn: portcullis
userPassword: {}
",
        ssha(service_password)
    )
}

/// `{SSHA}` of `password`: base64 of SHA-1(password + salt) followed by the 8-byte salt, the
/// form slappasswd makes and slapd checks.
fn ssha(password: &str) -> String {
    use sha1::{Digest as _, Sha1};
    let salt: [u8; 8] = rand::random();
    let mut hasher = Sha1::new();
    hasher.update(password.as_bytes());
    hasher.update(salt);
    let mut raw = hasher.finalize().to_vec();
    raw.extend_from_slice(&salt);
    format!(
        "{{SSHA}}{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

/// Escapes an attribute value for use in a DN (RFC 4514): `,+"\<>;=` get a backslash, as do a
/// leading `#` or space and a trailing space; NUL becomes `\00`. `*`, `(` and `)` are ordinary
/// characters in a DN (they matter only in search filters).
fn escape_dn_value(value: &str) -> String {
    let last = value.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(value.len());
    for (i, c) in value.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            _ => out.push(c),
        }
    }
    out
}

/// The values of `attr` in the LDIF `ldif` (unwrapped: `ldif-wrap=no`), base64 ones decoded.
fn ldif_values(ldif: &str, attr: &str) -> Vec<String> {
    let plain = format!("{attr}: ");
    let encoded = format!("{attr}:: ");
    ldif.lines()
        .filter_map(|line| {
            if let Some(v) = line.strip_prefix(&plain) {
                return Some(v.to_string());
            }
            let v = line.strip_prefix(&encoded)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v)
                .expect("base64 in ldapsearch's output");
            Some(String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
}

/// Appends the LDIF line `name: value`, or `name:: <base64>` when the value is not an LDIF
/// SAFE-STRING (RFC 2849: non-ASCII, NUL, CR, LF, a leading space, `:` or `<`, or a trailing
/// space), so that any uid or DN survives the trip through ldapmodify.
fn ldif_line(ldif: &mut String, name: &str, value: &str) {
    let safe = !value.starts_with([' ', ':', '<'])
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| b.is_ascii() && !matches!(b, 0 | b'\n' | b'\r'));
    if safe {
        let _ = writeln!(ldif, "{name}: {value}");
    } else {
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        let _ = writeln!(ldif, "{name}:: {encoded}");
    }
}

// The harness's own test, through the real ldap-utils clients as a gateway would use LDAP.

/// Runs `tool` (an ldap-utils client) with `args`, trusting the test CA, and returns its output.
async fn client(tool: &str, slapd: &Slapd, args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(tool);
    cmd.args(["-x", "-o", "nettimeout=10"])
        .args(args)
        .env("LDAPTLS_CACERT", &slapd.ca_file)
        .env("LDAPTLS_REQCERT", "demand");
    run_tool(cmd, None).await
}

/// `ldapwhoami` as `dn` with `password` on `url`; `starttls` adds `-ZZ` (StartTLS required).
async fn whoami(slapd: &Slapd, url: &str, starttls: bool, dn: &str, password: &str) -> Output {
    let mut args = vec!["-H", url, "-D", dn, "-w", password];
    if starttls {
        args.push("-ZZ");
    }
    client("ldapwhoami", slapd, &args).await
}

/// Asserts that `uid` binds with `password` (StartTLS on `ldap://`) and is told its own DN.
async fn assert_binds(slapd: &Slapd, uid: &str, password: &str) {
    let dn = slapd.user_dn(uid);
    let out = whoami(slapd, &slapd.ldap_url, true, &dn, password).await;
    assert!(
        out.status.success(),
        "{uid} should bind:\n{}",
        describe(&out)
    );
    // slapd answers with its normalised DN, which may write an escaped character as hex
    // (`\,` as `\2C`): the two are compared with their escapes undone.
    let said = String::from_utf8_lossy(&out.stdout);
    let said = said.trim().strip_prefix("dn:").unwrap_or_default();
    assert_eq!(
        unescape_dn(said),
        unescape_dn(&dn),
        "whoami of {uid}: {said}"
    );
}

/// `dn` with its RFC 4514 escapes (`\c` and `\XX`) undone, for comparisons only.
fn unescape_dn(dn: &str) -> String {
    let mut bytes = Vec::with_capacity(dn.len());
    let mut rest = dn.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        rest = tail;
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        let hex = rest.get(..2).and_then(|h| std::str::from_utf8(h).ok());
        if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            bytes.push(byte);
            rest = &rest[2..];
        } else if let Some((&c, tail)) = rest.split_first() {
            bytes.push(c);
            rest = tail;
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Asserts that `uid` cannot bind with `password`: slapd says invalid credentials (49), which is
/// also what ppolicy answers for a locked account.
async fn assert_refused(slapd: &Slapd, uid: &str, password: &str) {
    let out = whoami(slapd, &slapd.ldap_url, true, &slapd.user_dn(uid), password).await;
    assert_eq!(
        out.status.code(),
        Some(49),
        "{uid} should be refused:\n{}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Invalid credentials"),
        "{}",
        describe(&out)
    );
}

/// The values of `attr` on the entry of `uid`, as the service account reads them (over
/// StartTLS, with the password from `service_password_file`).
async fn service_reads(slapd: &Slapd, uid: &str, attr: &str) -> Vec<String> {
    let dn = slapd.user_dn(uid);
    let password_file = slapd.service_password_file.to_str().expect("UTF-8 path");
    let out = client(
        "ldapsearch",
        slapd,
        &[
            "-H",
            &slapd.ldap_url,
            "-ZZ",
            "-D",
            &slapd.service_dn,
            "-y",
            password_file,
            "-b",
            &dn,
            "-s",
            "base",
            "-LLL",
            "-o",
            "ldif-wrap=no",
            "(objectClass=*)",
            attr,
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "the service account searches {dn}:\n{}",
        describe(&out)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("dn: ") || text.contains("dn:: "),
        "{dn} is found:\n{text}"
    );
    ldif_values(&text, attr)
}

#[tokio::test]
async fn slapd_harness_serves_tls_memberof_and_lockout() {
    let began = Instant::now();
    let mut slapd = Slapd::start().await;
    eprintln!("slapd started in {:?}", began.elapsed());

    let meta = std::fs::metadata(&slapd.service_password_file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(&slapd.service_password_file).unwrap(),
        slapd.service_password
    );

    slapd.add_user("alice", "alice-pw").await;
    slapd.add_user("bob", "bob-pw").await;

    // A user binds over StartTLS (-ZZ: the upgrade and the certificate check must succeed) and
    // over ldaps, trusting only the test CA.
    assert_binds(&slapd, "alice", "alice-pw").await;
    let alice = slapd.user_dn("alice");
    let out = whoami(&slapd, &slapd.ldaps_url, false, &alice, "alice-pw").await;
    assert!(
        out.status.success(),
        "alice binds over ldaps:\n{}",
        describe(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("dn:{alice}")
    );
    // So does the service account, with the password as given.
    let out = whoami(
        &slapd,
        &slapd.ldaps_url,
        false,
        &slapd.service_dn,
        &slapd.service_password,
    )
    .await;
    assert!(
        out.status.success(),
        "the service account binds:\n{}",
        describe(&out)
    );

    // A wrong password and an unknown user are refused.
    assert_refused(&slapd, "alice", "bob-pw").await;
    assert_refused(&slapd, "nobody", "alice-pw").await;

    // The service account reads mail but not passwords.
    assert_eq!(
        service_reads(&slapd, "alice", "mail").await,
        ["alice@example.org"]
    );
    assert!(service_reads(&slapd, "alice", "userPassword")
        .await
        .is_empty());

    // memberOf follows group membership.
    let admins = format!("cn=admins,ou=groups,{}", slapd.base_dn);
    let empty = format!("cn=empty,ou=groups,{}", slapd.base_dn);
    slapd.add_group("admins", &["alice"]).await;
    slapd.add_group("empty", &[]).await;
    assert_eq!(
        service_reads(&slapd, "alice", "memberOf").await,
        [admins.as_str()]
    );
    assert!(service_reads(&slapd, "bob", "memberOf").await.is_empty());
    slapd.add_to_group("empty", "bob").await;
    slapd.add_to_group("admins", "bob").await;
    let mut bobs = service_reads(&slapd, "bob", "memberOf").await;
    bobs.sort();
    assert_eq!(bobs, [admins.as_str(), empty.as_str()]);
    slapd.remove_from_group("admins", "alice").await;
    assert!(service_reads(&slapd, "alice", "memberOf").await.is_empty());
    // Removing the last member leaves the placeholder (a groupOfNames cannot be empty).
    slapd.remove_from_group("admins", "bob").await;
    assert_eq!(
        service_reads(&slapd, "bob", "memberOf").await,
        [empty.as_str()]
    );

    // A locked user cannot bind (even with the right password), another user still can, and
    // the service account sees the lock; unlocked, the user binds again.
    slapd.lock_user("alice").await;
    assert_eq!(
        service_reads(&slapd, "alice", "pwdAccountLockedTime").await,
        [LOCKED_FOREVER]
    );
    assert_refused(&slapd, "alice", "alice-pw").await;
    assert_binds(&slapd, "bob", "bob-pw").await;
    slapd.unlock_user("alice").await;
    slapd.unlock_user("alice").await; // unlocking twice is harmless
    assert!(service_reads(&slapd, "alice", "pwdAccountLockedTime")
        .await
        .is_empty());
    assert_binds(&slapd, "alice", "alice-pw").await;

    // A new password replaces the old one.
    slapd.set_password("alice", "alice-pw-2").await;
    assert_refused(&slapd, "alice", "alice-pw").await;
    assert_binds(&slapd, "alice", "alice-pw-2").await;

    // A uid with filter metacharacters and DN specials is stored and binds.
    let odd = r"we*ird(\uid),x+y=z";
    slapd.add_user(odd, "odd-pw").await;
    assert_eq!(
        slapd.user_dn(odd),
        r"uid=we*ird(\\uid)\,x\+y\=z,ou=people,dc=example,dc=org"
    );
    assert_binds(&slapd, odd, "odd-pw").await;
    assert_eq!(service_reads(&slapd, odd, "uid").await, [odd]);
    // The raw escape hatch works too.
    slapd.modify(&format!(
        "dn: {}\nchangetype: modify\nreplace: mail\nmail: odd@example.org\n",
        slapd.user_dn(odd)
    ));
    assert_eq!(
        service_reads(&slapd, odd, "mail").await,
        ["odd@example.org"]
    );

    // A deleted user can no longer bind, and leaves their groups, even one they were the only
    // member of: re-added under the same uid, they are in no group.
    slapd.add_group("solo", &["bob"]).await;
    slapd.delete_user("bob").await;
    assert_refused(&slapd, "bob", "bob-pw").await;
    slapd.add_user("bob", "bob-pw").await;
    assert!(service_reads(&slapd, "bob", "memberOf").await.is_empty());
    assert_binds(&slapd, "bob", "bob-pw").await;

    // Killed, slapd refuses connections; restarted, it serves the same data on the same ports.
    slapd.kill();
    for (url, starttls) in [(&slapd.ldap_url, true), (&slapd.ldaps_url, false)] {
        let out = whoami(&slapd, url, starttls, &alice, "alice-pw-2").await;
        assert!(!out.status.success(), "slapd is down:\n{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Can't contact LDAP server"),
            "{}",
            describe(&out)
        );
    }
    let began = Instant::now();
    slapd.restart().await;
    eprintln!("slapd restarted in {:?}", began.elapsed());
    assert_binds(&slapd, "alice", "alice-pw-2").await;
    let out = whoami(&slapd, &slapd.ldaps_url, false, &alice, "alice-pw-2").await;
    assert!(
        out.status.success(),
        "alice binds over ldaps again:\n{}",
        describe(&out)
    );
    assert_eq!(
        service_reads(&slapd, "alice", "mail").await,
        ["alice@example.org"]
    );
}
