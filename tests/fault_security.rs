//! Hostile images and unsafe settings through the `esgz-nbd` binary: TOC
//! bombs hit their limits with bounded memory, TLS certificates are verified
//! by default, and a bare `--listen` port binds loopback only.
//!
//! Path names that escape the root are covered by `e2e_bad_input.rs`
//! (`dot_dot_names_stay_under_root`, `absolute_names_land_under_root`);
//! credentials in logs by `fault_registry.rs` (`revoked_token_refreshed`) and
//! cache file modes by `fault_disk.rs` (`cache_files_private`).
//!
//! Needs root (network namespaces), iproute2, openssl and GNU time.

#[path = "support/mod.rs"]
mod support;

use std::fs;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use support::{
    copy_layout, esgz_bin, fixture_dir, gzip, replace_toc_member, set_toc_digest_annotation,
    sha256_digest, toc_member, TOC_TAR_NAME,
};

/// Peak resident memory allowed while a bomb is rejected, in KiB. The binary
/// needs about 20 MiB on its own; the bombs below would need gigabytes.
const BOMB_PEAK_RSS_KIB: u64 = 400 * 1024;

/// Runs `esgz-nbd export` under GNU time; returns its exit success, stderr
/// and peak resident memory in KiB.
fn export_with_peak_memory(image: &str, dir: &Path) -> (bool, String, u64) {
    let stats = dir.join("time.txt");
    let output = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&stats)
        .arg(esgz_bin())
        .arg("export")
        .arg(image)
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--output")
        .arg(dir.join("out.img"))
        .output()
        .expect("running esgz-nbd export under /usr/bin/time (apt-get install time)");
    let peak = fs::read_to_string(&stats)
        .expect("reading the time output")
        .lines()
        .last()
        .and_then(|line| line.trim().parse::<u64>().ok())
        .expect("time printed the peak memory");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr, peak)
}

/// Puts `toc_json` into layer 0 of a copy of the basic fixture with a
/// matching toc.digest annotation, so only the TOC's content is wrong.
fn layout_with_toc_json(toc_json: &[u8]) -> tempfile::TempDir {
    let layout = copy_layout(&fixture_dir("basic").join("oci"));
    replace_toc_member(layout.path(), 0, &toc_member(toc_json));
    set_toc_digest_annotation(layout.path(), 0, &sha256_digest(toc_json));
    layout
}

/// Five million empty entries (15 MB of JSON, 15 KB compressed) exceed the
/// entry limit: the export fails naming the limit, before the entries take
/// the 1.4 GB of memory they would need.
#[test]
fn toc_entry_bomb_rejected() {
    let count = 5_000_000usize;
    let mut json = Vec::with_capacity(count * 3 + 32);
    json.extend_from_slice(br#"{"version":1,"entries":["#);
    for index in 0..count {
        if index > 0 {
            json.push(b',');
        }
        json.extend_from_slice(b"{}");
    }
    json.extend_from_slice(b"]}");
    let layout = layout_with_toc_json(&json);
    let dir = tempfile::tempdir().expect("temp dir");

    let started = Instant::now();
    let (success, stderr, peak) = export_with_peak_memory(
        &format!("oci:{}:latest", layout.path().display()),
        dir.path(),
    );
    assert!(!success, "the export of an entry bomb succeeded");
    assert!(
        stderr.contains("entries") && stderr.contains("4000000"),
        "the error does not name the entry limit: {stderr}"
    );
    assert!(
        peak < BOMB_PEAK_RSS_KIB,
        "rejecting the entry bomb took {peak} KiB of memory"
    );
    eprintln!(
        "entry bomb: rejected in {:?} with a peak of {peak} KiB",
        started.elapsed()
    );
}

/// A TOC tar entry that claims 4 GiB (gzip of a header and a little data):
/// the export fails naming the size limit, with small memory.
#[test]
fn toc_size_bomb_rejected() {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header
        .set_path(TOC_TAR_NAME)
        .expect("the TOC name fits a tar header");
    header.set_size(4 << 30);
    header.set_mode(0o644);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend_from_slice(&vec![b' '; 1 << 20]);
    let member = gzip(&tar);

    let layout = copy_layout(&fixture_dir("basic").join("oci"));
    replace_toc_member(layout.path(), 0, &member);
    let dir = tempfile::tempdir().expect("temp dir");
    let (success, stderr, peak) = export_with_peak_memory(
        &format!("oci:{}:latest", layout.path().display()),
        dir.path(),
    );
    assert!(!success, "the export of a size bomb succeeded");
    assert!(
        stderr.contains("limit"),
        "the error does not name the size limit: {stderr}"
    );
    assert!(
        peak < BOMB_PEAK_RSS_KIB,
        "rejecting the size bomb took {peak} KiB of memory"
    );
}

/// Address given to loopback inside the test's network namespace. It is not
/// a loopback address, so esgz-nbd uses HTTPS for it.
const NAMESPACE_ADDR: &str = "10.213.0.1";

/// Runs `script` with `sh` in a new network namespace whose loopback device
/// also carries `NAMESPACE_ADDR`; returns its combined output.
fn in_network_namespace(script: &str) -> String {
    let setup = format!("ip link set lo up && ip addr add {NAMESPACE_ADDR}/32 dev lo && {script}");
    let output = Command::new("unshare")
        .args(["--net", "sh", "-c", &setup])
        .output()
        .expect("running unshare (util-linux)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A registry with a self-signed certificate: the export fails with a
/// certificate error that names the option to skip verification, and with
/// that option the TLS handshake succeeds.
#[test]
fn self_signed_tls_rejected_by_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let key = dir.path().join("key.pem");
    let cert = dir.path().join("cert.pem");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={NAMESPACE_ADDR}")])
        .args(["-addext", &format!("subjectAltName=IP:{NAMESPACE_ADDR}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success(), "openssl could not make a certificate");

    let export = |extra: &str| {
        format!(
            "{bin} export {NAMESPACE_ADDR}:8443/faults/tls:latest --cache-dir {cache} --output {out} {extra} 2>&1",
            bin = esgz_bin().display(),
            cache = dir.path().join("cache").display(),
            out = dir.path().join("out.img").display(),
        )
    };
    // openssl s_server returns an HTML status page for every GET.
    let script = format!(
        "openssl s_server -quiet -www -accept {NAMESPACE_ADDR}:8443 -key {key} -cert {cert} >/dev/null 2>&1 &
         server=$!
         sleep 1
         echo '--- verified'
         timeout 60 {verified}
         echo '--- skipped'
         timeout 60 {skipped}
         kill $server",
        key = key.display(),
        cert = cert.display(),
        verified = export(""),
        skipped = export("--insecure-skip-tls-verify"),
    );
    let output = in_network_namespace(&script);
    let (verified, skipped) = output
        .split_once("--- skipped")
        .unwrap_or_else(|| panic!("the script did not run both exports:\n{output}"));

    assert!(
        verified.contains("certificate"),
        "the default export does not name the certificate problem:\n{verified}"
    );
    assert!(
        verified.contains("--insecure-skip-tls-verify"),
        "the error does not name the option:\n{verified}"
    );
    assert!(
        !skipped.contains("certificate"),
        "with --insecure-skip-tls-verify the certificate is still rejected:\n{skipped}"
    );
    assert!(
        skipped.contains("error"),
        "the export from an HTML page succeeded:\n{skipped}"
    );
}

/// `--listen PORT` binds 127.0.0.1, as the kernel's socket table shows.
#[test]
fn bare_listen_port_binds_loopback() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("finding a free port")
        .local_addr()
        .expect("the bound address")
        .port();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(esgz_bin())
        .arg("serve")
        .arg(format!(
            "oci:{}:latest",
            fixture_dir("links").join("oci").display()
        ))
        .arg("--listen")
        .arg(port.to_string())
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting esgz-nbd serve");
    let stdout = child.stdout.take().expect("the server's stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the server's address line");

    let tcp = fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    let tcp6 = fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let port_hex = format!(":{port:04X}");
    // Column 2 is the local address, column 4 the state (0A = LISTEN).
    let listening: Vec<String> = tcp
        .lines()
        .chain(tcp6.lines())
        .filter_map(|row| {
            let columns: Vec<&str> = row.split_whitespace().collect();
            (columns.len() > 3 && columns[1].ends_with(&port_hex) && columns[3] == "0A")
                .then(|| columns[1].to_string())
        })
        .collect();

    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        listening,
        vec![format!("0100007F{port_hex}")],
        "listening sockets on port {port}; the server printed {line:?}"
    );
    assert!(
        line.starts_with(&format!("nbd://127.0.0.1:{port}/")),
        "the server printed {line:?}"
    );
}
