// Bundles the pages into dist/: serve dist/ as a static root to get /demo/ and /live/.
import { build } from "esbuild";
import { cp, mkdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, "dist");
const pages = ["demo", "live"];

await rm(dist, { recursive: true, force: true });

for (const page of pages) {
  const out = join(dist, page);
  await mkdir(out, { recursive: true });
  await build({
    entryPoints: [join(root, "src", `${page}.ts`)],
    outfile: join(out, `${page}.js`),
    bundle: true,
    format: "iife",
    platform: "browser",
    target: "es2020",
    minify: true,
    sourcemap: true,
    legalComments: "linked",
    logLevel: "warning",
  });
  await cp(join(root, page), out, { recursive: true });
  await cp(join(root, "styles", "base.css"), join(out, "base.css"));
}

// A small index so that / leads somewhere.
await cp(join(root, "styles", "index.html"), join(dist, "index.html"));

console.log(`built ${pages.map((p) => `dist/${p}/`).join(", ")}`);
