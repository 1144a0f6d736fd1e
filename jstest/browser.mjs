// Opens a page in headless Chromium (Debian's, driven by playwright-core) and prints the text
// of its #log once it shows a received message, for test_js.py.
import { chromium } from "playwright-core";

const [pageUrl] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--ignore-certificate-errors"],
});
try {
  const page = await browser.newPage();
  await page.goto(pageUrl);
  await page.waitForFunction(() => /got |error /.test(document.getElementById("log").textContent),
                             null, { timeout: 20000 });
  console.log(await page.textContent("#log"));
} finally {
  await browser.close();
}
