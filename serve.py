"""
A local page and JSON API for one trained model: pick a class (or type a prompt, or draw a hint),
the number of images, steps, CFG scale and seed; the images appear and each can be downloaded.

    python serve.py --out_dir=out-shapes                  # then open http://127.0.0.1:8000
    python serve.py --out_dir=out-distill --ckpt_name=student1.pt   # a student: its own steps
    curl -s localhost:8000/api/generate -d '{"class": "red circle", "n": 4, "seed": 1}'

GET /api/info says what the model takes; POST /api/generate takes a JSON object (class, prompt, n,
steps, cfg, seed, hint, control_scale: each optional) and answers {"images": [PNG data URLs], ...}.
The model is loaded once; one worker thread owns the device and runs queued requests in batches
(requests with the same steps, CFG and hint use batched together), never two at once. A request's
images depend on its seed only: the same as `sample.py --classes=... --per_class=n --seed=...`.

Every request is bounded (images, steps, CFG, prompt length, body and upload size, time to send
the body, requests waiting); bad input is a 4xx with a one-line JSON error, never a traceback. The
server serves the model it was started with and nothing else: no request names a file. It binds
127.0.0.1; --host=0.0.0.0 shares it on the network (no authentication: a trusted network only).
Standard library only (http.server): no web framework to install for a page this small.
"""

import base64
import io
import json
import math
import os
import queue
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from PIL import Image

import distill
from checkpoint import load_model
from configurator import check
from images import encode_prompts, hint_of, sample_images
from model import input_shape, setup_device
from samplers import default_solver, solver_name

# -----------------------------------------------------------------------------
# the model: out_dir/ckpt_name (a ckpt.pt, best.pt, student or model.safetensors)
out_dir = 'out'
ckpt_name = 'ckpt.pt'
use_ema = True
host = '127.0.0.1'
# 0: any free port (the line printed at start names it)
port = 8000
# the page's starting values (steps 0: a student's own, else 20)
steps = 0
cfg_scale = 4.0
# what one request may ask for
max_images = 16
max_steps = 100
max_cfg = 20.0
max_prompt = 300
# a request body, hint upload included; the hint's pixels (checked before it is decoded)
max_body = 4 << 20
max_hint_pixels = 4096 * 4096
# requests queued or running; beyond: 503 (busy), not an ever-growing queue
max_queue = 32
# open connections; beyond: 503 at once
max_connections = 64
# images in one batched call on the device
max_batch = 64
# seconds a client may take to send its request
timeout = 10.0
device = 'auto'
dtype = 'auto'
# -----------------------------------------------------------------------------
FIELDS = ('class', 'prompt', 'n', 'steps', 'cfg', 'seed', 'hint', 'control_scale')


class BadRequest(ValueError):
    """One line for the client: what is wrong with its request (HTTP status `status`)."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Job:
    """One request: what to sample and, once the worker has run it, its images or its error."""

    def __init__(self, label, prompt, n, steps, cfg, seed, hint, control_scale):
        self.label, self.prompt, self.n, self.seed = label, prompt, n, seed
        self.steps, self.cfg, self.hint, self.control_scale = steps, cfg, hint, control_scale
        self.images, self.error, self.done = None, None, threading.Event()

    def batch_key(self):
        """Requests with equal keys run in one batched call: the same solver, guidance, hints."""
        return (self.steps, self.cfg, self.control_scale, self.hint is None)


class Model:
    """The loaded model and what it takes: one per server, used only by the worker thread."""

    def __init__(self, path, dev, autocast):
        self.model, self.diffusion, self.meta, config = load_model(path, dev, use_ema)
        self.dev, self.autocast, self.path = dev, autocast, path
        self.student = config.get('student')
        c = self.model.config
        self.is_text, self.hint_size = bool(c.text_dim), c.hint_size if c.hint_channels else 0
        # a text model is asked by prompt, whatever labels its data also had (as in sample.py)
        has_classes = self.meta['num_classes'] and not self.is_text
        self.classes = list(self.meta.get('class_names') or []) if has_classes else []
        # a guided student learned a range of CFG scales (distill.py)
        lo, hi = (self.student or {}).get('cfg') or (0.0, max_cfg)
        self.cfg_range = (lo, min(hi, max_cfg))
        self.steps = steps or (self.student or {}).get('steps') or 20

    def info(self):
        """What the page and GET /api/info show: what a request may ask of this model."""
        kind = 'text' if self.is_text else 'class' if self.classes else 'unconditional'
        return dict(
            model=self.path,
            kind=kind,
            classes=self.classes,
            hint_size=self.hint_size,
            student_steps=(self.student or {}).get('steps'),
            defaults=dict(
                steps=self.steps, cfg=min(max(cfg_scale, self.cfg_range[0]), self.cfg_range[1])
            ),
            limits=dict(
                n=max_images,
                steps=max_steps,
                cfg=list(self.cfg_range),
                prompt=max_prompt,
                body=max_body,
            ),
        )

    def solver(self, n_steps):
        """A student at its own steps: DDIM on its grid; else the default solver (samplers.py)."""
        if self.student and n_steps == self.student['steps']:
            return dict(distill.solver(self.student), order=1), 'its own grid'
        s = default_solver(self.diffusion.objective, n_steps)
        return s, solver_name(s['sampler'], s['order'], s['spacing'])

    def generate(self, jobs):
        """The images of jobs that share a batch_key, in one batched call: each job's noise from
        its own seed, as sample_images draws it -> uint8 [sum of n, 3, H, W]."""
        first, dev = jobs[0], self.dev
        shape = input_shape(self.meta)
        noise = torch.cat(
            [
                torch.randn(
                    (j.n,) + shape, generator=torch.Generator(dev).manual_seed(j.seed), device=dev
                )
                for j in jobs
            ]
        )
        labels = torch.tensor([j.label for j in jobs for _ in range(j.n)], device=dev)
        kw = {}
        if self.is_text:
            kw['text'], kw['null_text'] = encode_prompts(
                [j.prompt for j in jobs for _ in range(j.n)], self.meta, dev
            )
        if first.hint is not None:
            kw['hint'] = torch.cat([j.hint.expand(j.n, -1, -1, -1) for j in jobs]).to(dev)
        solver, _ = self.solver(first.steps)
        return sample_images(
            self.model,
            self.diffusion,
            labels,
            self.meta,
            first.cfg,
            autocast=self.autocast,
            batch_size=max_batch,
            control_scale=first.control_scale,
            noise=noise,
            steps=first.steps,
            **solver,
            **kw,
        )

    def parse(self, body):
        """A request body -> Job, or BadRequest naming the field and what it may be."""
        try:
            req = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"malformed JSON ({str(e)[:80]})") from None
        if not isinstance(req, dict):
            raise BadRequest("the body must be a JSON object, e.g. {\"n\": 4, \"seed\": 1}")
        unknown = [k for k in req if k not in FIELDS]
        if unknown:
            raise BadRequest(
                f"unknown field {unknown[0][:40]!r}: the fields are {', '.join(FIELDS)}"
            )
        lo, hi = self.cfg_range
        return Job(
            label=self.parse_class(req.get('class')),
            prompt=self.parse_prompt(req.get('prompt')),
            n=integer(req, 'n', 1, 1, max_images),
            steps=integer(req, 'steps', self.steps, 1, max_steps),
            cfg=number(req, 'cfg', self.info()['defaults']['cfg'], lo, hi),
            seed=integer(req, 'seed', 0, 0, 2**31 - 1),
            hint=self.parse_hint(req.get('hint')),
            control_scale=number(req, 'control_scale', 1.0, 0.0, 2.0),
        )

    def parse_class(self, value):
        """A class name or index -> its index; a model without classes takes none."""
        if value is None:
            if self.classes:
                raise BadRequest(f"'class' is missing: a name ({self.classes[0]!r}, ...) or index")
            return 0
        if not self.classes:
            raise BadRequest(f"this is a {self.info()['kind']} model: it takes no 'class'")
        if isinstance(value, str) and value in self.classes:
            return self.classes.index(value)
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value < len(self.classes)
        ):
            return value
        raise BadRequest(
            f"'class' must be one of the {len(self.classes)} names or 0..{len(self.classes) - 1}"
        )

    def parse_prompt(self, value):
        """A text model's prompt ('' draws unconditioned); other models take none."""
        if value is None:
            return '' if self.is_text else None
        if not self.is_text:
            raise BadRequest("this model was trained on class labels: it takes no 'prompt'")
        if not isinstance(value, str) or len(value) > max_prompt:
            raise BadRequest(f"'prompt' must be a string of at most {max_prompt} characters")
        return value

    def parse_hint(self, value):
        """A control model's hint: a data URL of an image (PNG, JPEG, ...) -> [1, 1, S, S]."""
        if value is None:
            return None
        if not self.hint_size:
            raise BadRequest("this model has no control branch: it takes no 'hint'")
        head, _, data = value.partition(',') if isinstance(value, str) else ('', '', '')
        if not (head.startswith('data:image/') and head.endswith(';base64')):
            raise BadRequest("'hint' must be an image as a data URL (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(data, validate=True)
            with Image.open(io.BytesIO(raw)) as img:
                w, h = img.size
        except Exception:
            raise BadRequest("'hint' is not a readable image") from None
        if w * h > max_hint_pixels:
            raise BadRequest(f"'hint' is {w}x{h} pixels: at most {max_hint_pixels} in all", 413)
        try:
            return hint_of(io.BytesIO(raw), self.hint_size)
        except ValueError as e:
            raise BadRequest(f"'hint' is not a usable image ({e})") from None


def integer(req, key, default, lo, hi):
    """req[key] as an int in [lo, hi] (default if absent); a bool or float is not one."""
    value = req.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be an integer from {lo} to {hi}")
    return value


def number(req, key, default, lo, hi):
    """req[key] as a finite float in [lo, hi] (default if absent)."""
    value = req.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'{key}' must be a number from {lo:g} to {hi:g}")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise BadRequest(f"'{key}' must be a number from {lo:g} to {hi:g}")
    return float(value)


def png_url(image):
    """uint8 [3, H, W] -> a PNG data URL."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def take_batch(pending):
    """From the waiting jobs (oldest first): the oldest and those that can share its call, up to
    max_batch images. -> (batch, the rest)."""
    key, batch, rest, total = pending[0].batch_key(), [], [], 0
    for job in pending:
        if job.batch_key() == key and total + job.n <= max_batch:
            batch.append(job)
            total += job.n
        else:
            rest.append(job)
    return batch, rest


def worker(model, jobs):
    """The only thread that touches the model: waits for jobs, runs them in batches, forever."""
    pending = []
    while True:
        if not pending:
            pending.append(jobs.get())
        while True:
            try:
                pending.append(jobs.get_nowait())
            except queue.Empty:
                break
        batch, pending = take_batch(pending)
        t0 = time.time()
        try:
            images = model.generate(batch).split([j.n for j in batch])
            for job, part in zip(batch, images):
                job.images = [png_url(im) for im in part]
        # a failed batch answers its requests and the worker goes on (SystemExit: NaN samples)
        except (Exception, SystemExit) as e:
            msg = str(e).removeprefix('error: ').splitlines()[0][:200] if str(e) else repr(e)
            for job in batch:
                job.error = f"sampling failed: {msg}"
        n = sum(j.n for j in batch)
        print(f"batch of {len(batch)} request(s), {n} image(s): {time.time() - t0:.2f} s")
        for job in batch:
            job.done.set()


class Handler(BaseHTTPRequestHandler):
    """GET / (the page), GET /api/info, POST /api/generate; anything else a one-line error."""

    server_version = 'nanodiffusion'

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (a malformed request line, an unknown method): JSON, one line
        self.close_connection = True
        self.send_json(code, dict(error=message or self.responses.get(code, ('error',))[0]))

    def log_message(self, fmt, *args):
        # one line a request on stderr, without the date http.server adds
        sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def do_GET(self):
        if self.path == '/':
            body = PAGE.encode()
            self.send_response(200)
            self.send_header('Content-Type', 'text/html; charset=utf-8')
            self.send_header('Content-Length', str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == '/api/info':
            self.send_json(200, self.server.model.info())
        else:
            self.send_json(404, dict(error=f"no page {self.path[:60]!r}: GET / or /api/info"))

    def do_POST(self):
        if self.path != '/api/generate':
            return self.send_json(404, dict(error="POST /api/generate is the only POST"))
        try:
            job = self.server.model.parse(self.read_body())
        except BadRequest as e:
            self.close_connection = True
            return self.send_json(e.status, dict(error=str(e)))
        # a place in the queue, or busy now (not an unbounded wait)
        if not self.server.slots.acquire(blocking=False):
            return self.send_json(503, dict(error=f"busy: {max_queue} requests waiting; retry"))
        try:
            t0 = time.time()
            self.server.jobs.put(job)
            job.done.wait()
        finally:
            self.server.slots.release()
        if job.error:
            return self.send_json(500, dict(error=job.error))
        _, how = self.server.model.solver(job.steps)
        self.send_json(
            200,
            dict(
                images=job.images,
                seed=job.seed,
                steps=job.steps,
                cfg=job.cfg,
                sampler=how,
                seconds=round(time.time() - t0, 3),
            ),
        )

    def read_body(self):
        """The request body: its declared length bounded before reading, and read within the
        handler's timeout (a slow client gets 408, not a thread held forever)."""
        try:
            length = int(self.headers.get('Content-Length', ''))
        except ValueError:
            raise BadRequest("a body with a Content-Length is needed", 411) from None
        if not 0 <= length <= max_body:
            raise BadRequest(f"the body is {length} bytes: at most {max_body}", 413)
        try:
            body = self.rfile.read(length)
        except TimeoutError:
            raise BadRequest(f"the body did not arrive within {timeout:g} s", 408) from None
        if len(body) < length:
            raise BadRequest(f"the body ended after {len(body)} of {length} bytes")
        return body


class Server(ThreadingHTTPServer):
    """A thread a connection, at most max_connections at once; the model's jobs go to one worker."""

    daemon_threads = True

    def __init__(self, address, model):
        super().__init__(address, Handler)
        self.model, self.jobs = model, queue.Queue()
        self.slots = threading.BoundedSemaphore(max_queue)
        self.connections = threading.BoundedSemaphore(max_connections)
        threading.Thread(target=worker, args=(model, self.jobs), daemon=True).start()

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            body = b'{"error": "busy: too many connections; retry"}'
            head = f"HTTP/1.0 503 Service Unavailable\r\nContent-Length: {len(body)}\r\n"
            request.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
            return self.shutdown_request(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


def main():
    from configurator import configure

    configure(globals(), sys.argv[1:])
    check(
        globals(),
        positive=('max_images', 'max_steps', 'max_prompt', 'max_body', 'max_queue', 'timeout'),
        non_negative=('steps', 'cfg_scale', 'port'),
        choices=dict(dtype=('auto', 'float32', 'bfloat16', 'float16')),
    )
    dev, _, autocast = setup_device(device, dtype)
    model = Model(os.path.join(out_dir, ckpt_name), dev, autocast)
    Handler.timeout = timeout
    try:
        server = Server((host, port), model)
    except OSError as e:
        raise SystemExit(
            f"error: cannot listen on {host}:{port} ({e.strerror}): try --port="
        ) from None
    url = f"http://{host}:{server.server_port}"
    print(
        f"serving {model.path} ({model.info()['kind']} model) at {url}  (Ctrl-C stops)", flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print('stopped')
    server.server_close()


PAGE = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.html')).read()

if __name__ == '__main__':
    main()
