//! `AmiClient` over TLS against a fake AMI server using the test certificates in `tests/tls/`.

use std::io::BufReader;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hintfed_ami::{
    AmiClient, AmiCodec, Auth, ClientConfig, ConnectionState, Frame, Message, TlsConfig, actions,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::time::timeout;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_util::codec::Framed;

const PATIENCE: Duration = Duration::from_secs(10);

fn tls_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tls")
}

fn acceptor() -> TlsAcceptor {
    let dir = tls_dir();
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        std::fs::File::open(dir.join("server.pem")).expect("server.pem"),
    ))
    .collect::<Result<Vec<_>, _>>()
    .expect("certs");
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        std::fs::File::open(dir.join("server.key")).expect("server.key"),
    ))
    .expect("key file")
    .expect("a key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("server config");
    TlsAcceptor::from(Arc::new(config))
}

/// Serves one TLS AMI session: banner, plain login, then answers one Ping. Returns whether
/// the TLS handshake succeeded.
async fn serve_one(listener: &TcpListener, acceptor: &TlsAcceptor) -> bool {
    let (tcp, _) = timeout(PATIENCE, listener.accept())
        .await
        .expect("client connects")
        .expect("accept");
    let Ok(mut tls) = acceptor.accept(tcp).await else {
        return false;
    };
    tls.write_all(b"Asterisk Call Manager/13.0.0\r\n")
        .await
        .expect("banner");
    let mut io = Framed::new(tls, AmiCodec::server());
    let mut answered_ping = false;
    while !answered_ping {
        let Some(Ok(Frame::Message(m))) = timeout(PATIENCE, io.next()).await.expect("action")
        else {
            return true;
        };
        let mut reply = Message::new()
            .with("Response", "Success")
            .with("ActionID", m.action_id().unwrap_or_default());
        if m.action_name() == Some("Ping") {
            reply.push("Ping", "Pong");
            answered_ping = true;
        }
        io.send(&reply).await.expect("reply");
    }
    true
}

fn config(addr: String, tls: TlsConfig) -> ClientConfig {
    let mut cfg = ClientConfig::new(addr, "admin", "adminsecret");
    cfg.auth = Auth::Plain;
    cfg.tls = Some(tls);
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    cfg.logoff_timeout = Duration::from_millis(100);
    cfg
}

#[tokio::test]
async fn tls_with_ca_file() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let acceptor = acceptor();
    let client = AmiClient::start(config(
        addr,
        TlsConfig {
            server_name: "ami.test".into(),
            ca_file: Some(tls_dir().join("ca.pem")),
            insecure_skip_verify: false,
        },
    ));
    let server = tokio::spawn(async move { serve_one(&listener, &acceptor).await });
    assert!(client.wait_connected(PATIENCE).await);
    let pong = client.send(actions::ping()).await.expect("ping over TLS");
    assert_eq!(pong.get("Ping"), Some("Pong"));
    assert!(server.await.expect("join"));
    client.shutdown().await;
}

#[tokio::test]
async fn tls_refuses_an_unknown_ca_unless_told_to_skip() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let acceptor = acceptor();

    // Without the CA the certificate is refused: never connected, the reason says TLS.
    let refused = AmiClient::start(config(
        addr.clone(),
        TlsConfig {
            server_name: "ami.test".into(),
            ca_file: None,
            insecure_skip_verify: false,
        },
    ));
    assert!(!serve_one(&listener, &acceptor).await, "handshake refused");
    let mut watch = refused.state_watch();
    let state = timeout(
        PATIENCE,
        watch.wait_for(|s| matches!(s, ConnectionState::Disconnected { .. })),
    )
    .await
    .expect("in time")
    .expect("watch")
    .clone();
    let ConnectionState::Disconnected { reason } = state else {
        unreachable!()
    };
    assert!(reason.contains("TLS"), "{reason}");
    refused.shutdown().await;

    // insecure_skip_verify accepts it.
    let client = AmiClient::start(config(
        addr,
        TlsConfig {
            server_name: "localhost".into(),
            ca_file: None,
            insecure_skip_verify: true,
        },
    ));
    let server = tokio::spawn(async move {
        // Skip any leftover attempt of the refused client.
        loop {
            if serve_one(&listener, &acceptor).await {
                break;
            }
        }
    });
    assert!(client.wait_connected(PATIENCE).await);
    let pong = client.send(actions::ping()).await.expect("ping");
    assert_eq!(pong.get("Ping"), Some("Pong"));
    server.await.expect("join");
    client.shutdown().await;
}
