//! Small async helpers.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

/// Runs `futures` concurrently on the current task and returns their outputs in order.
/// (Borrowing futures cannot be spawned; this polls each one until all are done.)
pub async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_them_concurrently_and_keeps_the_order() {
        // The first future can only finish after the second has run: joined one after the
        // other they would never finish.
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let first =
            Box::pin(async move { rx.await.unwrap_or(0) }) as Pin<Box<dyn Future<Output = u32>>>;
        let second = Box::pin(async move {
            let _ = tx.send(7);
            2u32
        }) as Pin<Box<dyn Future<Output = u32>>>;
        let joined = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            join_all(vec![first, second]),
        )
        .await
        .expect("join_all ran the futures one after the other");
        assert_eq!(joined, vec![7, 2]);
    }
}
