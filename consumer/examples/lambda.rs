//! A Lambda function on a Kinesis stream of claimcheck pointers: it prints every event of
//! every chunk, as JSON, to the function's log.
//!
//! Build it with `cargo lambda build --release --features lambda --example lambda` (or any
//! `provided.al2023` build), and create the Kinesis event source mapping with
//! `FunctionResponseTypes: ["ReportBatchItemFailures"]`. The function needs `s3:GetObject` on
//! the bucket the pointers name.

use claimcheck_consumer::lambda::{Consumer, KinesisEvent};
use claimcheck_consumer::Resolver;
use lambda_runtime::{service_fn, Error, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), Error> {
    let config = aws_config::load_from_env().await;
    let consumer = &Consumer::new(Resolver::new(aws_sdk_s3::Client::new(&config)));
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<KinesisEvent>| async move {
            let response = consumer.handle(&event.payload, async |chunk| {
                for event in &chunk.events {
                    println!("{}", event.to_json());
                }
                Ok::<_, Error>(())
            });
            Ok::<_, Error>(response.await?)
        },
    ))
    .await
}
