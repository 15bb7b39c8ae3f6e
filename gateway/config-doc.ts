/** Prints the README's configuration table: `npm run config:doc`. */
import { configMarkdown } from './config.ts';

console.log(configMarkdown());
