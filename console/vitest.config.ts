import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // Node 20 has WebSocket behind a flag; 22 has it on.
    pool: "forks",
    poolOptions: { forks: { execArgv: ["--experimental-websocket"] } },
    testTimeout: 90_000,
    hookTimeout: 60_000,
    fileParallelism: false,
  },
});
