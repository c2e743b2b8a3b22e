//! Flocker's v1 configuration files: `application.yml` (what runs) and `deployment.yml`
//! (where). Parsed from a position-keeping YAML tree ([`yaml`]) so that every error names
//! file, line, column and key; nothing runs unless both files are valid together.

pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use yaml::{Key, Node, Pos, Value};

/// Port an agent listens on for the deployer when `deployment.yml` gives none.
pub const DEFAULT_AGENT_PORT: u16 = 7701;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub pos: Pos,
    /// Dotted path of the offending key, e.g. `applications.es.ports[0].external`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: ",
            self.file.display(),
            self.pos.line,
            self.pos.col
        )?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortMap {
    pub internal: u16,
    pub external: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Link {
    pub local_port: u16,
    pub remote_port: u16,
    pub alias: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Application {
    pub name: String,
    pub image: String,
    pub ports: Vec<PortMap>,
    pub links: Vec<Link>,
    /// Absolute path inside the container where the application's volume is mounted.
    pub volume: Option<PathBuf>,
    pub environment: BTreeMap<String, String>,
    /// Bytes.
    pub mem_limit: Option<u64>,
    pub cpu_shares: Option<u64>,
    /// Used by the process runtime; optional for Docker (the image's default).
    pub command: Vec<String>,
}

/// A node as written in `deployment.yml`: host (IP or name) and agent port.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct NodeAddr {
    pub host: String,
    pub port: u16,
}

impl NodeAddr {
    pub fn parse(s: &str) -> Result<NodeAddr, String> {
        let bad = || format!("`{s}` is not a node address (IP or host name, optional :port)");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once(']').ok_or_else(bad)?;
            (h, p.strip_prefix(':'))
        } else if s.matches(':').count() == 1 {
            let (h, p) = s.split_once(':').ok_or_else(bad)?;
            (h, Some(p))
        } else {
            (s, None)
        };
        if host.is_empty()
            || host
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_')))
        {
            return Err(bad());
        }
        let port = match port {
            None => DEFAULT_AGENT_PORT,
            Some(p) => p.parse().map_err(|_| bad())?,
        };
        Ok(NodeAddr {
            host: host.to_string(),
            port,
        })
    }

    /// `host:port`, brackets around IPv6.
    pub fn socket(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port == DEFAULT_AGENT_PORT {
            f.write_str(&self.host)
        } else {
            f.write_str(&self.socket())
        }
    }
}

/// Both files, checked together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub applications: BTreeMap<String, Application>,
    /// Every node and the applications it should run, in file order.
    pub nodes: Vec<(NodeAddr, Vec<String>)>,
}

impl Cluster {
    /// The node an application is assigned to.
    pub fn node_of(&self, app: &str) -> Option<&NodeAddr> {
        self.nodes
            .iter()
            .find(|(_, apps)| apps.iter().any(|a| a == app))
            .map(|(n, _)| n)
    }
}

/// Reads and checks `deployment.yml` and `application.yml`.
pub fn load(deployment: &Path, application: &Path) -> Result<Cluster, ConfigError> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| ConfigError {
            file: p.to_path_buf(),
            pos: Pos { line: 0, col: 0 },
            key: String::new(),
            message: format!("cannot read: {e}"),
        })
    };
    parse(
        deployment,
        &read(deployment)?,
        application,
        &read(application)?,
    )
}

/// Parses and checks the two files' contents (paths are for messages).
pub fn parse(
    deployment_file: &Path,
    deployment_text: &str,
    application_file: &Path,
    application_text: &str,
) -> Result<Cluster, ConfigError> {
    let apps_doc = Doc::parse(application_file, application_text)?;
    let (applications, app_pos) = apps_doc.applications()?;
    let dep_doc = Doc::parse(deployment_file, deployment_text)?;
    let nodes = dep_doc.nodes(Some(&applications))?;
    check_ports_and_links(&apps_doc, &applications, &app_pos)?;
    Ok(Cluster {
        applications,
        nodes,
    })
}

/// Reads `deployment.yml` alone: the nodes and what each should run (not cross-checked).
pub fn load_nodes(deployment: &Path) -> Result<Vec<(NodeAddr, Vec<String>)>, ConfigError> {
    let text = std::fs::read_to_string(deployment).map_err(|e| ConfigError {
        file: deployment.to_path_buf(),
        pos: Pos { line: 0, col: 0 },
        key: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    Doc::parse(deployment, &text)?.nodes(None)
}

/// Positions of what cross-checks may need to point at.
#[derive(Default)]
struct AppPositions {
    /// (application, index) → position of `ports[i].external` / `links[i].remote_port`.
    external: HashMap<(String, usize), Pos>,
    remote: HashMap<(String, usize), Pos>,
}

struct Doc<'a> {
    file: &'a Path,
    root: Node,
}

impl<'a> Doc<'a> {
    fn parse(file: &'a Path, text: &str) -> Result<Doc<'a>, ConfigError> {
        let root = yaml::parse(text).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            pos: e.pos,
            key: String::new(),
            message: format!("invalid YAML: {}", e.message),
        })?;
        Ok(Doc { file, root })
    }

    fn err(&self, pos: Pos, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            pos,
            key: key.to_string(),
            message: message.into(),
        }
    }

    fn map<'n>(&self, node: &'n Node, key: &str) -> Result<&'n [(Key, Node)], ConfigError> {
        match &node.value {
            Value::Map(m) => Ok(m),
            _ => Err(self.err(
                node.pos,
                key,
                format!("expected a mapping, found a {}", node.kind()),
            )),
        }
    }

    fn seq<'n>(&self, node: &'n Node, key: &str) -> Result<&'n [Node], ConfigError> {
        match &node.value {
            Value::Seq(s) => Ok(s),
            _ => Err(self.err(
                node.pos,
                key,
                format!("expected a list, found a {}", node.kind()),
            )),
        }
    }

    fn string(&self, node: &Node, key: &str) -> Result<String, ConfigError> {
        match &node.value {
            Value::Scalar { .. } if node.kind() == "null" => {
                Err(self.err(node.pos, key, "expected a string, found nothing"))
            }
            Value::Scalar { text, .. } => Ok(text.clone()),
            _ => Err(self.err(
                node.pos,
                key,
                format!("expected a string, found a {}", node.kind()),
            )),
        }
    }

    fn integer(&self, node: &Node, key: &str, max: u64) -> Result<u64, ConfigError> {
        match &node.value {
            Value::Scalar {
                text,
                quoted: false,
            } => match text.parse::<u64>() {
                Ok(v) if v <= max => Ok(v),
                Ok(_) => Err(self.err(node.pos, key, format!("{text} is over the maximum {max}"))),
                Err(_) => Err(self.err(
                    node.pos,
                    key,
                    format!("expected a whole number, found `{text}`"),
                )),
            },
            _ => Err(self.err(
                node.pos,
                key,
                format!("expected a whole number, found a {}", describe(node)),
            )),
        }
    }

    fn port(&self, node: &Node, key: &str) -> Result<u16, ConfigError> {
        let p = self.integer(node, key, 65535)?;
        if p == 0 {
            return Err(self.err(node.pos, key, "port 0 is not a port"));
        }
        Ok(p as u16)
    }

    /// Fails on the first key not in `allowed`.
    fn only(
        &self,
        entries: &[(Key, Node)],
        allowed: &[&str],
        path: &str,
    ) -> Result<(), ConfigError> {
        for (k, _) in entries {
            if !allowed.contains(&k.name.as_str()) {
                return Err(self.err(
                    k.pos,
                    &join(path, &k.name),
                    format!("unknown key (expected one of: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn version(&self, top: &[(Key, Node)]) -> Result<(), ConfigError> {
        match top.iter().find(|(k, _)| k.name == "version") {
            None => Err(self.err(self.root.pos, "version", "missing `version: 1`")),
            Some((_, v)) => match self.integer(v, "version", u64::MAX)? {
                1 => Ok(()),
                n => Err(self.err(
                    v.pos,
                    "version",
                    format!("version {n} is not supported (only 1)"),
                )),
            },
        }
    }

    fn applications(&self) -> Result<(BTreeMap<String, Application>, AppPositions), ConfigError> {
        let top = self.map(&self.root, "")?;
        self.only(top, &["version", "applications"], "")?;
        self.version(top)?;
        let Some((_, apps)) = top.iter().find(|(k, _)| k.name == "applications") else {
            return Err(self.err(self.root.pos, "applications", "missing `applications`"));
        };
        let mut out = BTreeMap::new();
        let mut pos = AppPositions::default();
        if apps.kind() == "null" {
            return Ok((out, pos));
        }
        for (name, node) in self.map(apps, "applications")? {
            let path = format!("applications.{}", name.name);
            if name.name.is_empty()
                || !name
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(self.err(
                    name.pos,
                    &path,
                    "application names use letters, digits, '-', '_' and '.'",
                ));
            }
            let app = self.application(name, node, &path, &mut pos)?;
            out.insert(name.name.clone(), app);
        }
        Ok((out, pos))
    }

    fn application(
        &self,
        key: &Key,
        node: &Node,
        path: &str,
        pos: &mut AppPositions,
    ) -> Result<Application, ConfigError> {
        let name = key.name.as_str();
        let fields = self.map(node, path)?;
        self.only(
            fields,
            &[
                "image",
                "ports",
                "links",
                "volume",
                "environment",
                "mem_limit",
                "cpu_shares",
                "command",
            ],
            path,
        )?;
        let get = |k: &str| fields.iter().find(|(key, _)| key.name == k).map(|(_, v)| v);
        let image = match get("image") {
            Some(v) => self.string(v, &join(path, "image"))?,
            None => {
                return Err(self.err(key.pos, &join(path, "image"), "missing `image`"));
            }
        };
        let mut app = Application {
            name: name.to_string(),
            image,
            ports: Vec::new(),
            links: Vec::new(),
            volume: None,
            environment: BTreeMap::new(),
            mem_limit: None,
            cpu_shares: None,
            command: Vec::new(),
        };
        if let Some(ports) = get("ports") {
            for (i, p) in self.seq(ports, &join(path, "ports"))?.iter().enumerate() {
                let ppath = format!("{path}.ports[{i}]");
                let f = self.map(p, &ppath)?;
                self.only(f, &["internal", "external"], &ppath)?;
                let field = |k: &str| -> Result<&Node, ConfigError> {
                    f.iter()
                        .find(|(key, _)| key.name == k)
                        .map(|(_, v)| v)
                        .ok_or_else(|| self.err(p.pos, &join(&ppath, k), format!("missing `{k}`")))
                };
                let internal = self.port(field("internal")?, &join(&ppath, "internal"))?;
                let ext_node = field("external")?;
                let external = self.port(ext_node, &join(&ppath, "external"))?;
                pos.external.insert((name.to_string(), i), ext_node.pos);
                app.ports.push(PortMap { internal, external });
            }
        }
        if let Some(links) = get("links") {
            for (i, l) in self.seq(links, &join(path, "links"))?.iter().enumerate() {
                let lpath = format!("{path}.links[{i}]");
                let f = self.map(l, &lpath)?;
                self.only(f, &["local_port", "remote_port", "alias"], &lpath)?;
                let field = |k: &str| -> Result<&Node, ConfigError> {
                    f.iter()
                        .find(|(key, _)| key.name == k)
                        .map(|(_, v)| v)
                        .ok_or_else(|| self.err(l.pos, &join(&lpath, k), format!("missing `{k}`")))
                };
                let local_port = self.port(field("local_port")?, &join(&lpath, "local_port"))?;
                let remote = field("remote_port")?;
                let remote_port = self.port(remote, &join(&lpath, "remote_port"))?;
                pos.remote.insert((name.to_string(), i), remote.pos);
                let alias = self.string(field("alias")?, &join(&lpath, "alias"))?;
                app.links.push(Link {
                    local_port,
                    remote_port,
                    alias,
                });
            }
        }
        if let Some(v) = get("volume") {
            let vpath = join(path, "volume");
            let f = self.map(v, &vpath)?;
            self.only(f, &["mountpoint"], &vpath)?;
            let Some((_, m)) = f.iter().find(|(k, _)| k.name == "mountpoint") else {
                return Err(self.err(v.pos, &join(&vpath, "mountpoint"), "missing `mountpoint`"));
            };
            let mount = self.string(m, &join(&vpath, "mountpoint"))?;
            if !mount.starts_with('/') {
                return Err(self.err(
                    m.pos,
                    &join(&vpath, "mountpoint"),
                    format!("mountpoint `{mount}` must be an absolute path"),
                ));
            }
            app.volume = Some(PathBuf::from(mount));
        }
        if let Some(env) = get("environment") {
            let epath = join(path, "environment");
            if env.kind() != "null" {
                for (k, v) in self.map(env, &epath)? {
                    let value = match &v.value {
                        Value::Scalar { text, .. } => text.clone(),
                        _ => {
                            return Err(self.err(
                                v.pos,
                                &join(&epath, &k.name),
                                format!("expected a string, found a {}", v.kind()),
                            ));
                        }
                    };
                    app.environment.insert(k.name.clone(), value);
                }
            }
        }
        if let Some(m) = get("mem_limit") {
            app.mem_limit = Some(self.integer(m, &join(path, "mem_limit"), u64::MAX)?);
        }
        if let Some(c) = get("cpu_shares") {
            app.cpu_shares = Some(self.integer(c, &join(path, "cpu_shares"), 262_144)?);
        }
        if let Some(c) = get("command") {
            let cpath = join(path, "command");
            for (i, arg) in self.seq(c, &cpath)?.iter().enumerate() {
                app.command
                    .push(self.string(arg, &format!("{cpath}[{i}]"))?);
            }
        }
        Ok(app)
    }

    /// The nodes; with `apps`, each listed application must be defined there.
    fn nodes(
        &self,
        apps: Option<&BTreeMap<String, Application>>,
    ) -> Result<Vec<(NodeAddr, Vec<String>)>, ConfigError> {
        let top = self.map(&self.root, "")?;
        self.only(top, &["version", "nodes"], "")?;
        self.version(top)?;
        let Some((_, nodes)) = top.iter().find(|(k, _)| k.name == "nodes") else {
            return Err(self.err(self.root.pos, "nodes", "missing `nodes`"));
        };
        let mut out: Vec<(NodeAddr, Vec<String>)> = Vec::new();
        let mut placed: HashMap<String, (String, Pos)> = HashMap::new();
        for (addr, list) in self.map(nodes, "nodes")? {
            let path = format!("nodes.{}", addr.name);
            let node = NodeAddr::parse(&addr.name).map_err(|e| self.err(addr.pos, &path, e))?;
            if let Some((other, _)) = out.iter().find(|(n, _)| *n == node) {
                return Err(self.err(addr.pos, &path, format!("node {other} is listed twice")));
            }
            let mut names = Vec::new();
            if list.kind() != "null" {
                for (i, item) in self.seq(list, &path)?.iter().enumerate() {
                    let ipath = format!("{path}[{i}]");
                    let name = self.string(item, &ipath)?;
                    if apps.is_some_and(|a| !a.contains_key(&name)) {
                        return Err(self.err(
                            item.pos,
                            &ipath,
                            format!("application `{name}` is not defined in the application file"),
                        ));
                    }
                    if let Some((first, at)) = placed.get(&name) {
                        return Err(self.err(
                            item.pos,
                            &ipath,
                            format!(
                                "application `{name}` is already on node {first} (line {}); an application runs on one node",
                                at.line
                            ),
                        ));
                    }
                    placed.insert(name.clone(), (addr.name.clone(), item.pos));
                    names.push(name);
                }
            }
            out.push((node, names));
        }
        Ok(out)
    }
}

fn check_ports_and_links(
    doc: &Doc<'_>,
    apps: &BTreeMap<String, Application>,
    pos: &AppPositions,
) -> Result<(), ConfigError> {
    let mut exposed: HashMap<u16, String> = HashMap::new();
    for app in apps.values() {
        for (i, p) in app.ports.iter().enumerate() {
            let at = pos
                .external
                .get(&(app.name.clone(), i))
                .copied()
                .unwrap_or_default();
            if let Some(other) = exposed.get(&p.external) {
                return Err(doc.err(
                    at,
                    &format!("applications.{}.ports[{i}].external", app.name),
                    format!(
                        "external port {} is already used by `{other}`; each external port is routed cluster-wide to one application",
                        p.external
                    ),
                ));
            }
            exposed.insert(p.external, app.name.clone());
        }
    }
    for app in apps.values() {
        for (i, l) in app.links.iter().enumerate() {
            if !exposed.contains_key(&l.remote_port) {
                let at = pos
                    .remote
                    .get(&(app.name.clone(), i))
                    .copied()
                    .unwrap_or_default();
                return Err(doc.err(
                    at,
                    &format!("applications.{}.links[{i}].remote_port", app.name),
                    format!(
                        "no application exposes external port {} for the link `{}`",
                        l.remote_port, l.alias
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(node: &Node) -> String {
    match &node.value {
        Value::Scalar { .. } if node.kind() == "null" => "nothing".into(),
        Value::Scalar { text, quoted: true } => format!("quoted string \"{text}\""),
        _ => node.kind().to_string(),
    }
}

#[cfg(test)]
mod tests;
