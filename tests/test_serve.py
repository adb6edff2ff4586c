"""serve.py end to end on tiny models: a class model, its control branch, a text model and a
distilled student, each trained a few steps. The images a request gets are sample_images' for its
seed, batched or not; one call at a time on the model; a corpus of hostile requests each answered
4xx with one line and the server still serving; concurrent clients all answered with memory flat;
and the page in a real headless Chromium (Debian's chromium + chromium-driver, installed by
.ci/run)."""

import base64
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import serve
from conftest import require
from images import sample_images
from test_control_train import prepared
from test_text import make_bert
from test_train import ENV, run, train

pytestmark = pytest.mark.usefixtures('one_thread')
CPU = torch.device('cpu')
SIZE = 16


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    """out_dirs of a class model (2 steps on mask-hinted shapes), its control branch (2 more
    steps) and a text model (captions by a tiny random BERT)."""
    data = prepared(tmp_path_factory.mktemp('data') / 'mask', '--hint=mask')
    base, control, text = (str(tmp_path_factory.mktemp(n)) for n in ('base', 'control', 'text'))
    train(data, base, '--max_iters=2', '--eval_interval=0')
    train(data, control, f'--init_from={base}/ckpt.pt', '--max_iters=2', '--eval_interval=0')
    encoder = make_bert(str(tmp_path_factory.mktemp('bert')))
    captions = str(tmp_path_factory.mktemp('captions') / 'shapes')
    run(
        ['prepare.py', '--num_train=32', '--num_val=8', '--resolution=16', f'--out_dir={captions}']
        + [f'--text_encoder={encoder}', '--text_max_len=8']
    )
    train(captions, text, '--max_iters=2', '--eval_interval=0')
    # a 1-step guidance-distilled student of the class model
    student = str(tmp_path_factory.mktemp('student'))
    distil = [f'--init_from={base}/ckpt.pt', '--distill_steps=(1,)', '--distill_cfg=(1.0, 5.0)']
    train(data, student, *distil, '--max_iters=2', '--eval_interval=0')
    return dict(base=base, control=control, text=text, student=student)


def load(out):
    return serve.Model(os.path.join(out, 'ckpt.pt'), CPU, nullcontext())


def png(image_size, colour=255):
    buf = io.BytesIO()
    Image.new('L', image_size, colour).save(buf, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buf.getvalue()).decode()


def decode(url):
    head, _, data = url.partition(',')
    assert head == 'data:image/png;base64'
    return torch.from_numpy(np.array(Image.open(io.BytesIO(base64.b64decode(data))))).permute(
        2, 0, 1
    )


def test_a_request_gets_sample_images_for_its_seed_batched_or_not(models):
    for name in ('base', 'control', 'text'):
        m = load(models[name])
        fields = dict(n=2, steps=3, cfg=2.0)
        if name == 'text':
            fields['prompt'] = 'a red circle'
        else:
            fields['class'] = 'green square'
        if name == 'control':
            fields['hint'] = png((40, 40))
        a = m.parse(json.dumps(dict(fields, seed=5)).encode())
        b = m.parse(json.dumps(dict(fields, seed=9, n=3)).encode())
        together = m.generate([a, b])
        alone = [m.generate([a]), m.generate([b])]
        assert torch.equal(together, torch.cat(alone)), name
        # what sample.py draws for the same seed and label
        solver, _ = m.solver(3)
        kw = dict(steps=3, **solver)
        if name == 'text':
            kw['text'], kw['null_text'] = serve.encode_prompts(['a red circle'] * 2, m.meta, CPU)
        if name == 'control':
            kw['hint'] = a.hint.expand(2, -1, -1, -1)
        labels = torch.full((2,), 0 if name == 'text' else 5)
        direct = sample_images(m.model, m.diffusion, labels, m.meta, 2.0, seed=5, **kw)
        assert torch.equal(alone[0], direct), name
        assert alone[0].shape == (2, 3, SIZE, SIZE)
        assert not torch.equal(alone[0], alone[1][:2])


def test_a_student_samples_its_own_grid_at_its_cfg_scales(models):
    m = load(models['student'])
    info = m.info()
    assert info['student_steps'] == 1 and info['defaults'] == dict(steps=1, cfg=4.0)
    assert info['limits']['cfg'] == [1.0, 5.0]
    job = m.parse(b'{"class": 2, "n": 2, "seed": 3}')
    solver, how = m.solver(1)
    assert solver['sampler'] == 'ddim' and how == 'its own grid'
    labels = torch.full((2,), 2)
    direct = sample_images(m.model, m.diffusion, labels, m.meta, 4.0, seed=3, steps=1, **solver)
    assert torch.equal(m.generate([job]), direct)
    with pytest.raises(serve.BadRequest, match="'cfg' must be a number from 1 to 5"):
        m.parse(b'{"class": 2, "cfg": 6}')


def test_parse_fills_defaults_and_names_what_is_wrong(models):
    m = load(models['base'])
    job = m.parse(b'{"class": 3}')
    assert (job.label, job.n, job.steps, job.cfg, job.seed, job.hint) == (3, 1, 20, 4.0, 0, None)
    bad = {
        '{"class": 3, "n": 17}': "'n' must be an integer from 1 to 16",
        '{"class": 3, "n": true}': "'n' must be an integer",
        '{"class": 3, "steps": 2.5}': "'steps' must be an integer from 1 to 100",
        '{"class": 3, "cfg": "high"}': "'cfg' must be a number from 0 to 20",
        '{"class": 3, "seed": -1}': "'seed' must be an integer",
        '{"class": "purple hexagon"}': "'class' must be one of the 12 names",
        '{"class": 3, "prompt": "a cat"}': "takes no 'prompt'",
        '{"class": 3, "hint": "data:image/png;base64,AAAA"}': "no control branch",
        '{"class": 3, "file": "/etc/passwd"}': "unknown field 'file'",
        '{"n": 2}': "'class' is missing",
    }
    for body, words in bad.items():
        with pytest.raises(serve.BadRequest) as e:
            m.parse(body.encode())
        assert words in str(e.value) and '\n' not in str(e.value), (body, str(e.value))


def test_one_call_at_a_time_on_the_model_and_requests_batched(models, monkeypatch):
    m = load(models['base'])
    busy, most, sizes, lock = [0], [0], [], threading.Lock()
    real = m.generate

    def counting(jobs):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        sizes.append(len(jobs))
        # slow enough that requests pile up behind it
        time.sleep(0.2)
        try:
            return real(jobs)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(m, 'generate', counting)
    server = serve.Server(('127.0.0.1', 0), m)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    results = []

    def client(i):
        results.append(post(server.server_port, dict(n=1 + i % 3, steps=2, seed=i, **{'class': i})))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.shutdown()
    server.server_close()
    assert [status for status, _ in results] == [200] * 8
    assert most[0] == 1 and sum(sizes) == 8 and max(sizes) > 1, sizes


def post(port, obj=None, raw=None, headers=None, timeout=60):
    """POST /api/generate -> (status, parsed JSON body)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    body = raw if raw is not None else json.dumps(obj).encode()
    conn.request('POST', '/api/generate', body=body, headers=headers or {})
    r = conn.getresponse()
    status, data = r.status, r.read()
    conn.close()
    return status, json.loads(data)


class Served:
    """serve.py in its own process on a free port, as a user starts it."""

    def __init__(self, out, tmp_path, *args):
        self.log = open(tmp_path / 'serve.log', 'w+')
        self.proc = subprocess.Popen(
            [sys.executable, 'serve.py', f'--out_dir={out}', '--port=0', '--device=cpu', *args],
            cwd=ROOT,
            env=ENV,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(600):
            text = open(self.log.name).read()
            if 'serving ' in text or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        assert 'serving ' in text, text
        self.port = int(text.split('http://127.0.0.1:')[1].split()[0])

    def info(self):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
        conn.request('GET', '/api/info')
        r = conn.getresponse()
        return r.status, json.loads(r.read())

    def rss_kb(self):
        status = open(f'/proc/{self.proc.pid}/status').read()
        return int(status.split('VmRSS:')[1].split()[0])

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def served(models, tmp_path):
    s = Served(models['control'], tmp_path, '--timeout=1')
    yield s
    s.close()


def raw_exchange(port, data, wait=0.0):
    """Send bytes on a fresh connection (then wait), return what comes back until it closes."""
    with socket.create_connection(('127.0.0.1', port), timeout=10) as s:
        s.sendall(data)
        time.sleep(wait)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b''.join(chunks)


def status_and_error(reply):
    head, _, body = reply.partition(b'\r\n\r\n')
    return int(head.split()[1]), json.loads(body)['error']


def test_hostile_requests_get_one_line_and_the_server_keeps_serving(served):
    big = png((5000, 4000), 0)
    corpus = [
        (dict(n=10**12), 400, "'n' must be an integer"),
        (dict(steps=10**6), 400, "'steps' must be an integer from 1 to 100"),
        (dict(cfg=1e308), 400, "'cfg' must be a number"),
        (dict(seed=2**70), 400, "'seed' must be an integer"),
        (dict(n='4'), 400, "'n' must be an integer"),
        (dict(cfg=[1]), 400, "'cfg' must be a number"),
        (dict(control_scale=None), 400, "'control_scale' must be a number"),
        (dict(ckpt='/etc/passwd'), 400, "unknown field 'ckpt'"),
        (dict(hint='/etc/passwd'), 400, "'hint' must be an image as a data URL"),
        (dict(hint='data:image/png;base64,not base64!'), 400, "'hint' is not a readable image"),
        (dict(hint='data:image/png;base64,' + base64.b64encode(b'x' * 99).decode()), 400, 'image'),
        (dict(hint=big), 413, "'hint' is 5000x4000 pixels"),
        (dict(prompt='a cat'), 400, "takes no 'prompt'"),
    ]
    for fields, status, words in corpus:
        got, error = post(served.port, dict({'class': 0}, **fields))
        error = error['error']
        assert got == status and words in error and '\n' not in error, (fields, got, error)
    raws = [
        (b'{"class": 0, "n": ', 400, 'malformed JSON'),
        (b'[' * 100000 + b']' * 100000, 400, 'malformed JSON'),
        (b'"just a string"', 400, 'must be a JSON object'),
        (b'\xff\xfe\x00garbage', 400, 'malformed JSON'),
    ]
    for body, status, words in raws:
        got, error = post(served.port, raw=body)
        error = error['error']
        assert got == status and words in error, (body[:20], got, error)
    # a huge body is refused from its declared length, before it is read
    head = b'POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{'
    assert status_and_error(raw_exchange(served.port, head))[0] == 413
    # no length, a wrong path, a method that does not exist
    assert (
        status_and_error(raw_exchange(served.port, b'POST /api/generate HTTP/1.0\r\n\r\n'))[0]
        == 411
    )
    assert (
        status_and_error(raw_exchange(served.port, b'GET /../../etc/passwd HTTP/1.0\r\n\r\n'))[0]
        == 404
    )
    assert status_and_error(raw_exchange(served.port, b'BREW / HTTP/1.0\r\n\r\n'))[0] == 501
    # a slow client: half its body, then nothing for longer than --timeout=1
    slow = b'POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{"class": 0'
    t0 = time.time()
    got, error = status_and_error(raw_exchange(served.port, slow, wait=0.1))
    assert got == 408 and 'did not arrive within 1 s' in error and time.time() - t0 < 5
    # headers that never end: the connection is closed after the timeout, no thread kept
    assert raw_exchange(served.port, b'POST /api/generate HTTP/1.1\r\nHost:') == b''
    # and it still serves, with a real hint
    assert served.info()[0] == 200
    got, out = post(served.port, {'class': 1, 'n': 2, 'steps': 2, 'hint': png((30, 20))})
    assert got == 200 and len(out['images']) == 2
    assert served.proc.poll() is None


def test_concurrent_clients_all_answered_memory_flat(served):
    def load_round(clients=8, each=3):
        answers = []

        def client(i):
            for k in range(each):
                n = 1 + (i + k) % 4
                status, out = post(served.port, {'class': i % 12, 'n': n, 'steps': 2, 'seed': k})
                answers.append((status, n, [decode(u).shape for u in out.get('images', [])]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(answers) == clients * each
        for status, n, shapes in answers:
            assert status == 200 and shapes == [(3, SIZE, SIZE)] * n

    # the first round allocates what the model and threads need; the next ones must not add to it
    load_round()
    before = served.rss_kb()
    for _ in range(3):
        load_round()
    grown = served.rss_kb() - before
    assert grown < 20_000, f"RSS grew {grown} kB over 72 more requests"
    # every request ran exactly once: the worker's batches add up to the 96 requests
    log = open(served.log.name).read()
    batches = [line.split() for line in log.splitlines() if line.startswith('batch of ')]
    assert sum(int(words[2]) for words in batches) == 96 and 'Traceback' not in log
    print(f"RSS {before} kB after the first round, {grown:+d} kB after 72 more requests")


def browser():
    """Selenium's Chrome driver on Debian's chromium and chromedriver; skipped where they are
    absent, a failure under NANODIFFUSION_REQUIRE_REFS=1 (CI installs them)."""
    webdriver = require('selenium.webdriver')
    found = [shutil.which(p) for p in ('chromium', 'chromedriver')]
    if not all(found):
        if os.environ.get('NANODIFFUSION_REQUIRE_REFS') == '1':
            pytest.fail("chromium and chromedriver are required (.ci/run installs them)")
        pytest.skip('no chromium/chromedriver here')
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (
        '--headless=new',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-dev-shm-usage',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--no-first-run',
        '--window-size=1000,700',
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(found[1]))


def test_the_page_in_a_real_browser(models, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    s = Served(models['base'], tmp_path)
    driver = browser()
    try:
        driver.get(f'http://127.0.0.1:{s.port}/')
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, 'generate').is_enabled())
        assert 'a class model' in driver.find_element(By.ID, 'model').text
        Select(driver.find_element(By.ID, 'class')).select_by_visible_text('3: yellow circle')
        for field, value in (('n', '3'), ('steps', '2'), ('seed', '7')):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, 'generate').click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#images img')) == 3)
        sizes = driver.execute_script(
            "return [...document.querySelectorAll('#images img')]"
            ".map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert sizes == [[True, SIZE, SIZE]] * 3
        assert '3 image(s)' in driver.find_element(By.ID, 'status').text
        # what the page shows is what the API gives for the same request
        links = driver.find_elements(By.CSS_SELECTOR, '#images a')
        status, out = post(s.port, {'class': 3, 'n': 3, 'steps': 2, 'seed': 7, 'cfg': 4.0})
        assert [a.get_attribute('href') for a in links] == out['images']
        assert links[0].get_attribute('download') == 'sample-seed7-0.png'
        # the README's curl line, as written but for the port
        line = next(x for x in open(os.path.join(ROOT, 'README.md')) if x.startswith('curl '))
        line = line.replace('localhost:8000', f'localhost:{s.port}')
        out = json.loads(subprocess.run(line, shell=True, capture_output=True, check=True).stdout)
        assert len(out['images']) == 4 and out['seed'] == 1
        # a bad value shows the server's one line
        box = driver.find_element(By.ID, 'n')
        box.clear()
        box.send_keys('99')
        driver.execute_script("document.getElementById('n').removeAttribute('max')")
        driver.find_element(By.ID, 'generate').click()
        wait.until(lambda d: 'must be an integer' in d.find_element(By.ID, 'status').text)
    finally:
        driver.quit()
        s.close()
