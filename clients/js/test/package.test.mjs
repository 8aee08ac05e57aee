// The package as a user gets it: `npm pack` contents, both entry points, and the type
// declarations (checked by compiling test/types/ with tsc, as ESM and as CommonJS).

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { createRequire } from 'node:module';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const root = fileURLToPath(new URL('..', import.meta.url));
const require = createRequire(import.meta.url);

test('npm pack lists the built files, the README and the licence, and nothing else', async () => {
  // --ignore-scripts: the build already ran (prepack would rebuild dist/ under the other tests).
  const { stdout } = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: root });
  const [pack] = JSON.parse(stdout);
  const files = pack.files.map((f) => f.path).sort();
  assert.equal(pack.name, 'orderpush-client');
  assert.equal(pack.version, '0.1.0');
  for (const f of ['package.json', 'README.md', 'LICENSE']) assert.ok(files.includes(f), f);
  for (const build of ['esm', 'cjs']) {
    for (const m of ['index', 'client', 'frames', 'position', 'backoff', 'url', 'transport', 'errors']) {
      assert.ok(files.includes(`dist/${build}/${m}.js`), `dist/${build}/${m}.js in ${files}`);
      assert.ok(files.includes(`dist/${build}/${m}.d.ts`), `dist/${build}/${m}.d.ts`);
    }
    assert.ok(files.includes(`dist/${build}/package.json`), 'the module type marker');
  }
  const stray = files.filter((f) => !/^(dist\/(esm|cjs)\/[a-z]+\.(js|d\.ts)|dist\/(esm|cjs)\/package\.json|package\.json|README\.md|LICENSE)$/.test(f));
  assert.deepEqual(stray, [], 'no sources, tests or node_modules');
});

test('package.json is publishable: MIT, entry points, ws as the only dependency', async () => {
  const pkg = require('../package.json');
  assert.equal(pkg.license, 'MIT');
  assert.equal(pkg.private, undefined);
  assert.deepEqual(Object.keys(pkg.dependencies), ['ws']);
  assert.deepEqual(pkg.exports['.'], {
    import: { types: './dist/esm/index.d.ts', default: './dist/esm/index.js' },
    require: { types: './dist/cjs/index.d.ts', default: './dist/cjs/index.js' },
  });
  assert.equal(pkg.main, './dist/cjs/index.js');
  assert.equal(pkg.module, './dist/esm/index.js');
  assert.equal(pkg.types, './dist/cjs/index.d.ts');
});

test('import gets the ES module build and require the CommonJS one, with the same API', async () => {
  assert.equal(import.meta.resolve('orderpush-client'), new URL('../dist/esm/index.js', import.meta.url).href);
  assert.equal(require.resolve('orderpush-client'), `${root}dist/cjs/index.js`);
  const esm = await import('orderpush-client');
  const cjs = require('orderpush-client');
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  assert.equal(typeof cjs.OrderpushClient, 'function');
  assert.notEqual(cjs.OrderpushClient, esm.OrderpushClient, 'two builds');
});

test('the declarations type a POS app precisely (tsc, as ESM and as CommonJS)', async () => {
  const tsc = `${root}node_modules/typescript/bin/tsc`;
  const result = await run(process.execPath, [tsc, '-p', `${root}test/types/tsconfig.json`]).catch((e) => e);
  assert.equal(result.code ?? 0, 0, `${result.stdout}${result.stderr}`);
});
