//! What the client logs: never the secret, one ERROR per streak of refused logins, the
//! connection span naming the address. Alone in its test binary, because it installs the global
//! tracing subscriber (a thread-local one races with other tests over callsite interest).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use hintfed_ami::{AmiClient, AmiCodec, Auth, ClientConfig, ConnectionState, Frame, Message};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_util::codec::Framed;

const PATIENCE: Duration = Duration::from_secs(10);

async fn accept(listener: &TcpListener) -> Framed<TcpStream, AmiCodec> {
    let (mut stream, _) = timeout(PATIENCE, listener.accept())
        .await
        .expect("client connects in time")
        .expect("accept");
    stream
        .write_all(b"Asterisk Call Manager/13.0.0\r\n")
        .await
        .expect("banner");
    Framed::new(stream, AmiCodec::server())
}

async fn answer_login(io: &mut Framed<TcpStream, AmiCodec>, kind: &str) -> Message {
    let Some(Ok(Frame::Message(login))) = timeout(PATIENCE, io.next()).await.expect("login") else {
        panic!("expected the login");
    };
    let mut reply = Message::new()
        .with("Response", kind)
        .with("ActionID", login.action_id().expect("id"));
    if kind == "Error" {
        reply.push("Message", "Authentication failed");
    }
    io.send(&reply).await.expect("reply");
    login
}

async fn wait_state(client: &AmiClient, f: impl Fn(&ConnectionState) -> bool) {
    let mut watch = client.state_watch();
    timeout(PATIENCE, watch.wait_for(|s| f(s)))
        .await
        .expect("state reached in time")
        .expect("watch open");
}

/// A `MakeWriter` collecting log output in memory.
#[derive(Clone, Default)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogBuf {
    type Writer = LogBuf;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn logs_never_show_the_secret_and_a_refusal_streak_is_one_error() {
    let logs = LogBuf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(logs.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("only subscriber");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let mut cfg = ClientConfig::new(addr.clone(), "admin", "s3cr3t-do-not-log");
    cfg.auth = Auth::Plain;
    cfg.backoff_initial = Duration::from_millis(10);
    cfg.backoff_max = Duration::from_millis(50);
    cfg.logoff_timeout = Duration::from_millis(100);
    let client = AmiClient::start(cfg);
    for _ in 0..3 {
        let mut io = accept(&listener).await;
        let login = answer_login(&mut io, "Error").await;
        assert_eq!(login.get("Secret"), Some("s3cr3t-do-not-log"));
        wait_state(&client, |s| {
            matches!(s, ConnectionState::Disconnected { .. })
        })
        .await;
    }
    // Then a good login.
    let mut io = accept(&listener).await;
    answer_login(&mut io, "Success").await;
    assert!(client.wait_connected(PATIENCE).await);
    client.shutdown().await;

    let text = String::from_utf8(logs.0.lock().expect("log lock").clone()).expect("utf8");
    assert!(
        !text.contains("s3cr3t-do-not-log"),
        "secret logged:\n{text}"
    );
    let errors = text.lines().filter(|l| l.contains("ERROR")).count();
    assert_eq!(errors, 1, "one ERROR for the refusal streak:\n{text}");
    assert!(text.contains("AMI login refused"), "{text}");
    assert!(text.contains(&addr), "connection span names the address");
}
