//! The gRPC server every service runs: its own services plus `grpc.health.v1.Health` and
//! server reflection (v1 and v1alpha, so grpcurl builds of any age can list and describe).

use std::future::Future;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection descriptors did not load (a build problem).
    #[error("cannot build the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("gRPC server failed")]
    Transport(#[from] tonic::transport::Error),
}

/// Health reporting for one gRPC service name and the overall server (`""`).
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    service: &'static str,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("service", &self.service)
            .finish()
    }
}

impl Health {
    /// Marks the server and `service` as serving or not.
    pub async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(self.service, status).await;
    }
}

/// Serves `routes`, plus health (starting NOT_SERVING) and reflection, on `listener` until
/// `shutdown` resolves. `service` is the fully qualified name health reports on, e.g.
/// `ferry.v1.PipeService`. Returns the health handle through `on_health` before serving.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service: &'static str,
    health_ready: impl FnOnce(Health),
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health { reporter, service };
    health.set(false).await;
    health_ready(health);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let routes = routes
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?);
    tonic::transport::Server::builder()
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
