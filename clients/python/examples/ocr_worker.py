"""An OCR-style worker that reports its job's progress to herald, page by page.

    python ocr_worker.py --url http://localhost:3000 --job scan-42 --pages 5
    python ocr_worker.py --redis-url redis://127.0.0.1:6379 --job scan-42   # through Redis

Every event carries an idempotency key derived from the job and page, so running the
worker again for the same job (after a crash, say) logs nothing twice. The OCR itself is
simulated.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, Optional

from herald_client import HeraldPublisher, RedisPublisher


def ocr_page(job: str, page: int) -> str:
    return f"{job} page {page}: lorem ipsum dolor sit amet"


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://localhost:3000", help="herald's HTTP address")
    ap.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    ap.add_argument("--redis-url", default=None, help="publish through Redis instead of HTTP")
    ap.add_argument("--redis-prefix", default="herald")
    ap.add_argument("--job", required=True, help="the session id to publish to")
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds of 'OCR' per page")
    args = ap.parse_args(argv)

    if args.redis_url:
        redis_pub = RedisPublisher(args.redis_url, prefix=args.redis_prefix)

        def send(event: str, data: Dict[str, Any], key: str) -> None:
            redis_pub.publish(args.job, event, data, idempotency_key=key)

        close: Callable[[], None] = redis_pub.close
    else:
        http_pub = HeraldPublisher(args.url, api_key=args.api_key)

        def send(event: str, data: Dict[str, Any], key: str) -> None:
            http_pub.publish(args.job, event, data, idempotency_key=key)

        close = http_pub.close

    job, total = args.job, args.pages
    try:
        counts = {"total": total, "completed": 0, "processing": 0, "pending": total, "failed": 0}
        send("progress", {"status": "ACTIVE", "progress": 0, "prompts": dict(counts)}, f"{job}:start")
        texts = []
        for page in range(1, total + 1):
            started = time.monotonic()
            time.sleep(args.delay)
            text = ocr_page(job, page)
            texts.append(text)
            send("model_result", {"promptId": f"page-{page}", "modelName": "tesseract", "provider": "ocr",
                                  "duration": int((time.monotonic() - started) * 1000), "result": text,
                                  "status": "completed"}, f"{job}:page-{page}:result")
            counts.update(completed=page, pending=total - page)
            send("progress", {"status": "COMPLETED" if page == total else "PROCESSING", "progress": round(100 * page / total),
                              "prompts": dict(counts), "page": page}, f"{job}:page-{page}:progress")
            print(f"page {page}/{total} done", flush=True)
        send("completed", {"result": {"pages": total, "text": "\n".join(texts)}}, f"{job}:completed")
        print(f"job {job} completed", flush=True)
    finally:
        close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
