import pytest

from configurator import configure

DEFAULTS = dict(batch_size=64, lr=1e-4, out_dir='out', compile=True, unet_mult=(1, 2, 2))


def run(argv, **kw):
    g = dict(DEFAULTS)
    return configure(g, argv, **kw), g


def test_overrides_are_parsed_as_literals():
    cfg, g = run(
        ['--batch_size=32', '--lr=3e-4', '--out_dir=out-x', '--compile=False', '--unet_mult=(1, 2)']
    )
    assert cfg == dict(batch_size=32, lr=3e-4, out_dir='out-x', compile=False, unet_mult=(1, 2))
    # the globals themselves are updated, nanoGPT style
    assert g['batch_size'] == 32


def test_int_for_float_and_strings_as_written():
    cfg, _ = run(['--lr=1', '--out_dir=2024'])
    assert cfg['lr'] == 1.0 and type(cfg['lr']) is float
    assert cfg['out_dir'] == '2024'


def test_config_file_then_overrides(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("batch_size = 16\nlr = 2e-4\nimport math\n_private = 1\n")
    cfg, _ = run([str(f), '--lr=5e-4'])
    assert cfg['batch_size'] == 16 and cfg['lr'] == 5e-4


@pytest.mark.parametrize(
    'argv, message',
    [
        (['--batchsize=32'], "unknown config key 'batchsize'"),
        (['--batch_size=3.5'], "'batch_size' (--batch_size) must be int, got float"),
        (['--compile=yes'], "'compile' (--compile) must be bool, got str"),
        (['--lr'], "must look like --key=value"),
        (['no_such_file.py'], "cannot read config file 'no_such_file.py'"),
    ],
)
def test_rejections_are_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / 'c.py'
    f.write_text("learning_rate = 1e-3\n")
    with pytest.raises(SystemExit, match=f"unknown config key 'learning_rate' \\({f}\\)"):
        run([str(f)])
    # bench.py reads train configs for their model keys
    cfg, _ = run([str(f)], ignore_unknown_in_files=True)
    assert cfg == DEFAULTS


def test_constants_are_not_settings():
    g = dict(DEFAULTS, SAMPLERS=('a', 'b'), IMAGE_EXTS=('.png',))
    # UPPER_CASE globals are the script's constants
    assert configure(g, []) == DEFAULTS
    with pytest.raises(SystemExit, match="unknown config key 'SAMPLERS'"):
        configure(g, ['--SAMPLERS=("c",)'])
