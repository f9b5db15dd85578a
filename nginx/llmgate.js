// njs for the llmgate edge: the sha256 of the bearer token, so nginx maps and caches hashes, never keys.
import crypto from 'crypto';

function key_hash(r) {
    var header = r.headersIn['Authorization'];
    if (!header || header.length < 8 || header.length > 600) {
        return '';
    }
    if (header.substring(0, 7).toLowerCase() !== 'bearer ') {
        return '';
    }
    var token = header.substring(7).trim();
    if (token.length === 0) {
        return '';
    }
    return crypto.createHash('sha256').update(token).digest('hex');
}

export default {key_hash};
